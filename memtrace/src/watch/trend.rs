//! Telling steady growth from noise and from one jump: a least-squares line through a
//! window of samples, how well it fits, and how evenly the growth is spread over the window.

/// What a window of samples says about a series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    /// The fitted line's slope, bytes per second.
    pub rate: f64,
    /// How sure the growth is steady, 0 to 1: the fit's R², scaled down when most of the
    /// growth came in one step.
    pub confidence: f64,
    /// Last value less first, bytes.
    pub growth: i64,
    /// Seconds the window spans.
    pub span_s: f64,
}

/// Fits `(seconds, bytes)` samples, oldest first. `None` with fewer than three samples or no
/// time between them.
pub fn fit(samples: &[(f64, u64)]) -> Option<Trend> {
    let n = samples.len();
    if n < 3 {
        return None;
    }
    let span_s = samples[n - 1].0 - samples[0].0;
    if span_s <= 0.0 {
        return None;
    }
    let nf = n as f64;
    let mean_t = samples.iter().map(|s| s.0).sum::<f64>() / nf;
    let mean_v = samples.iter().map(|s| s.1 as f64).sum::<f64>() / nf;
    let (mut stt, mut stv, mut svv) = (0.0, 0.0, 0.0);
    for &(t, v) in samples {
        let (dt, dv) = (t - mean_t, v as f64 - mean_v);
        stt += dt * dt;
        stv += dt * dv;
        svv += dv * dv;
    }
    if stt <= 0.0 {
        return None;
    }
    let rate = stv / stt;
    // A flat series fits any line perfectly and means nothing.
    let r2 = if svv > 0.0 {
        (stv * stv / (stt * svv)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let growth = samples[n - 1].1 as i64 - samples[0].1 as i64;
    // Growth in one step is a jump, not a trend: the largest rise's share of all the rises.
    let (mut rises, mut largest) = (0u64, 0u64);
    for w in samples.windows(2) {
        let rise = w[1].1.saturating_sub(w[0].1);
        rises += rise;
        largest = largest.max(rise);
    }
    let spread = if rises > 0 {
        1.0 - largest as f64 / rises as f64
    } else {
        0.0
    };
    // Growth spread over at least two steps of equal size counts fully.
    let confidence = if rate > 0.0 {
        r2 * (spread / 0.5).min(1.0)
    } else {
        0.0
    };
    Some(Trend {
        rate,
        confidence,
        growth,
        span_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(u64) -> u64, n: u64) -> Vec<(f64, u64)> {
        (0..n).map(|i| (i as f64, f(i))).collect()
    }

    #[test]
    fn a_steady_leak_is_sure_and_its_rate_right() {
        // 1 MiB/s on 100 MiB, with a little noise.
        let s = series(|i| (100 << 20) + (i << 20) + (i % 3) * 4096, 20);
        let t = fit(&s).unwrap();
        assert!(
            (t.rate - (1 << 20) as f64).abs() < 0.02 * (1 << 20) as f64,
            "{t:?}"
        );
        assert!(t.confidence > 0.95, "{t:?}");
        assert_eq!(t.growth, 19 << 20 | 4096);
    }

    #[test]
    fn one_jump_is_not_a_trend() {
        let s = series(|i| if i < 10 { 100 << 20 } else { 150 << 20 }, 20);
        let t = fit(&s).unwrap();
        assert!(t.rate > 0.0);
        assert!(t.confidence < 0.1, "{t:?}");
    }

    #[test]
    fn churn_around_a_level_is_not_growth() {
        // Up and down by 3 MiB around 32 MiB.
        let s = series(|i| (32 << 20) + if i % 2 == 0 { 3 << 20 } else { 0 }, 30);
        let t = fit(&s).unwrap();
        assert!(t.confidence < 0.2, "{t:?}");
        let flat = series(|_| 7 << 20, 10);
        let t = fit(&flat).unwrap();
        assert_eq!((t.rate, t.confidence, t.growth), (0.0, 0.0, 0));
    }

    #[test]
    fn shrinking_is_not_growth_and_too_few_samples_say_nothing() {
        let s = series(|i| (100 << 20) - (i << 20), 10);
        assert_eq!(fit(&s).unwrap().confidence, 0.0);
        assert_eq!(fit(&s[..2]), None);
    }
}
