//! `memtrace watch` for a person: a line per sample while it runs, a summary at the end.
use std::fmt::Write as _;

use super::{Finding, FindingKind, WatchEnd, WatchReport, Watcher};
use crate::units::{human_bytes, human_rate};

fn subject(f: &Finding) -> String {
    match (f.kind, &f.cache, f.pid) {
        (FindingKind::Slab, Some(cache), _) => format!("slab {cache}"),
        (kind, _, Some(pid)) => format!(
            "{} pid {pid} ({})",
            if kind == FindingKind::Uss {
                "uss"
            } else {
                "address space"
            },
            f.comm.as_deref().unwrap_or("?")
        ),
        (kind, _, None) => kind.as_str().to_string(),
    }
}

/// The live line after a sample: what grows and how fast, or that nothing does.
pub fn live_line(w: &Watcher) -> String {
    let t = w.elapsed().as_secs_f64();
    let growing = w.growing();
    let mut line = format!("[{t:>6.1}s] ");
    if growing.is_empty() {
        let _ = write!(
            line,
            "nothing grows steadily ({} processes, {} slab caches)",
            w.watched_processes(),
            w.watched_caches()
        );
        return line;
    }
    let parts: Vec<String> = growing
        .iter()
        .take(3)
        .map(|f| {
            format!(
                "{} {} {} ({:.2})",
                subject(f),
                human_bytes(f.bytes),
                human_rate(f.rate_bytes_per_s),
                f.confidence
            )
        })
        .collect();
    let _ = write!(line, "growing: {}", parts.join("; "));
    if growing.len() > 3 {
        let _ = write!(line, "; {} more", growing.len() - 3);
    }
    line
}

/// The summary at the end of a watch.
pub fn render(r: &WatchReport) -> String {
    let mut out = String::new();
    let why = match r.ended_by {
        WatchEnd::Deadline => "",
        WatchEnd::Signal => ", stopped by a signal",
        WatchEnd::TargetsExited => ", every watched process exited",
    };
    let exited = if r.exited > 0 {
        format!(" ({} more exited meanwhile)", r.exited)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "\nwatched {} processes{exited} and {} slab caches for {:.0}s ({} samples every \
         {:.1}s, trend window {:.0}s{why})",
        r.processes, r.caches, r.duration_s, r.samples, r.interval_s, r.window_s
    );
    if r.findings.is_empty() {
        let _ = writeln!(out, "no steady growth found");
    } else {
        let _ = writeln!(
            out,
            "\n{:<40} {:>12} {:>6} {:>10} {:>11} {:>9}  STATE",
            "GROWING", "RATE", "CONF", "NOW", "GROWTH", "FLAGGED"
        );
        for f in &r.findings {
            let state = if f.exited {
                "exited"
            } else if f.growing {
                "growing"
            } else {
                "stopped"
            };
            let sign = if f.growth_bytes < 0 { "-" } else { "+" };
            let _ = writeln!(
                out,
                "{:<40} {:>12} {:>6.2} {:>10} {:>11} {:>8.0}s  {state}",
                subject(f),
                human_rate(f.rate_bytes_per_s),
                f.confidence,
                human_bytes(f.bytes),
                format!("{sign}{}", human_bytes(f.growth_bytes.unsigned_abs())),
                f.flagged_at_s
            );
            for c in f.callsites.iter().take(3) {
                let count = if c.what.contains("bytes") {
                    human_bytes(c.count)
                } else {
                    c.count.to_string()
                };
                let _ = writeln!(
                    out,
                    "    {count} {}: {}",
                    c.what.trim_start_matches("bytes "),
                    c.frames
                        .iter()
                        .take(6)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" <- ")
                );
            }
            for t in f.threads.iter().take(3) {
                let _ = writeln!(
                    out,
                    "    thread {}: +{} anonymous RSS from {:.1}s to {:.1}s",
                    t.tid,
                    human_bytes(t.grown_bytes),
                    t.first_s,
                    t.last_s
                );
            }
            if let Some(note) = &f.trace_note {
                let _ = writeln!(out, "    trace: {note}");
            }
        }
    }
    for note in &r.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(
        out,
        "memtrace: {:.2}s CPU ({:.2}% of a CPU), peak RSS {}; USS from {}",
        r.agent.cpu_user_s + r.agent.cpu_sys_s,
        r.cpu_percent,
        human_bytes(r.agent.peak_rss_bytes),
        r.uss_source
    );
    out
}
