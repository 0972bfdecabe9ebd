//! How reports write sizes and ages for people.

/// Bytes in the largest binary unit that leaves at least 10 of it ("512 B", "20 MiB").
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 10 << 30 => format!("{} GiB", b >> 30),
        b if b >= 10 << 20 => format!("{} MiB", b >> 20),
        b if b >= 10 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A signed rate of bytes per second ("+1.0 MiB/s", "-512 B/s").
pub fn human_rate(bytes_per_s: f64) -> String {
    let sign = if bytes_per_s < 0.0 { "-" } else { "+" };
    let b = bytes_per_s.abs();
    let (value, unit) = if b >= (1 << 30) as f64 {
        (b / (1u64 << 30) as f64, "GiB")
    } else if b >= (1 << 20) as f64 {
        (b / (1u64 << 20) as f64, "MiB")
    } else if b >= 1024.0 {
        (b / 1024.0, "KiB")
    } else {
        return format!("{sign}{b:.0} B/s");
    };
    format!("{sign}{value:.1} {unit}/s")
}

/// Milliseconds as the largest unit that fits ("950ms", "1.5m").
pub fn human_age(ms: u64) -> String {
    match ms {
        ms if ms >= 3_600_000 => format!("{:.1}h", ms as f64 / 3_600_000.0),
        ms if ms >= 60_000 => format!("{:.1}m", ms as f64 / 60_000.0),
        ms if ms >= 1_000 => format!("{:.1}s", ms as f64 / 1_000.0),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_ages() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(20 << 20), "20 MiB");
        assert_eq!(human_rate(1048576.0), "+1.0 MiB/s");
        assert_eq!(human_rate(-300.0), "-300 B/s");
        assert_eq!(human_age(950), "950ms");
        assert_eq!(human_age(90_000), "1.5m");
    }
}
