//! One sampled figure over time: the samples inside the trend window, and a bounded history
//! for the plot.
use std::collections::VecDeque;

/// Points kept per series for the plot: when full, every other point goes and later samples
/// are kept at half the rate, so a long watch keeps its whole shape in bounded memory.
pub const HISTORY_POINTS: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct History {
    pub points: Vec<(f64, u64)>,
    /// Keep one sample in `stride`.
    stride: u64,
    seen: u64,
}

impl History {
    pub fn push(&mut self, t: f64, v: u64) {
        let stride = self.stride.max(1);
        if self.seen.is_multiple_of(stride) {
            if self.points.len() == HISTORY_POINTS {
                let mut i = 0;
                self.points.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride = stride * 2;
            }
            self.points.push((t, v));
        }
        self.seen += 1;
    }
}

/// A figure's samples: `(seconds since the watch began, bytes)`.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub window: VecDeque<(f64, u64)>,
    pub history: History,
    /// The first sample, for the growth over the whole watch.
    pub first: Option<(f64, u64)>,
}

impl Series {
    /// Adds a sample and drops those older than `window_s` before it.
    pub fn push(&mut self, t: f64, v: u64, window_s: f64) {
        self.first.get_or_insert((t, v));
        self.window.push_back((t, v));
        while self
            .window
            .front()
            .is_some_and(|&(t0, _)| t - t0 > window_s)
        {
            self.window.pop_front();
        }
        self.history.push(t, v);
    }

    pub fn last(&self) -> Option<u64> {
        self.window.back().map(|s| s.1)
    }

    pub fn samples(&mut self) -> &[(f64, u64)] {
        self.window.make_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_slides_and_the_history_stays_bounded() {
        let mut s = Series::default();
        for i in 0..10_000u64 {
            s.push(i as f64, i, 30.0);
        }
        assert_eq!(s.window.len(), 31);
        assert_eq!(s.window.front().unwrap().0, 9969.0);
        assert!(s.history.points.len() <= HISTORY_POINTS);
        assert!(s.history.points.len() > HISTORY_POINTS / 2);
        // It still spans the whole watch.
        assert_eq!(s.history.points[0], (0.0, 0));
        assert!(s.history.points.last().unwrap().0 > 9000.0);
        assert_eq!(s.first, Some((0.0, 0)));
    }
}
