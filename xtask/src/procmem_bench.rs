//! `memtrace vma`, `snapshot` and `watch` benchmarks: a loop of large mallocs (each its own
//! mmap and munmap) untraced and under system-wide tracers, interleaved; a snapshot of every
//! process; the CPU `watch` takes at one sample a second when nothing grows.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    background::{start, Tracer},
    median,
};

/// bpftrace counting mmap calls by user stack (what a bpftrace one-liner for "who maps"
/// does; it keeps no outstanding regions).
const BPFTRACE_MMAP_BY_STACK: &str = "tracepoint:syscalls:sys_exit_mmap { @[ustack] = count(); } \
     tracepoint:syscalls:sys_exit_munmap { @munmap = count(); } END { clear(@); }";

#[derive(Clone, Copy, Default)]
struct Run {
    seconds_per_block: f64,
    lost: u64,
    peak_rss_mib: u64,
    agent_ns_per_record: f64,
}

fn run_once(bin: &Path, tracer: Tracer, duration_ms: u64) -> Result<Run> {
    let running = start(bin, tracer)?;
    let out = crate::output(Command::new(bin.join("memtrace-workload")).args([
        "malloc-large",
        &duration_ms.to_string(),
        "262144",
    ]))?;
    let per_s = crate::workload_number(&out, "blocks_per_s")?;
    let report = match running {
        Some(r) => r.stop()?,
        None => String::new(),
    };
    let mut run = Run {
        seconds_per_block: 1.0 / per_s,
        ..Run::default()
    };
    if let Tracer::Memtrace(_) = tracer {
        let r = crate::memtrace_report(&report)?;
        run.lost = r["lost"]["events"].as_u64().unwrap_or(0);
        run.peak_rss_mib = r["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20;
        run.agent_ns_per_record = r["agent"]["cpu_ns_per_record"].as_f64().unwrap_or(0.0);
    }
    Ok(run)
}

pub fn bench(bin: &Path, runs: usize, bpftrace: bool) -> Result<()> {
    let mut configs: Vec<(&str, Tracer)> = vec![
        ("untraced", Tracer::None),
        ("memtrace vma (system-wide)", Tracer::Memtrace(&["vma"])),
        (
            "memtrace vma --faults",
            Tracer::Memtrace(&["vma", "--faults"]),
        ),
    ];
    if bpftrace {
        configs.push((
            "bpftrace: mmap by ustack",
            Tracer::Bpftrace(BPFTRACE_MMAP_BY_STACK, &[]),
        ));
    }
    let duration_ms = 2000;
    let mut results = vec![Vec::new(); configs.len()];
    for round in 0..runs {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            std::thread::sleep(Duration::from_millis(500));
            results[i].push(run_once(bin, configs[i].1, duration_ms)?);
        }
    }
    let times: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.iter().map(|r| r.seconds_per_block).collect())
        .collect();
    let base = median(times[0].clone());
    println!(
        "\nmalloc-large: malloc/free of 256 KiB blocks, each an mmap and a munmap ({duration_ms} ms \
         runs, {runs} rounds, interleaved)"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>7} {:>12} {:>6} {:>9} {:>12}",
        "configuration",
        "blocks/s",
        "per block",
        "ratio",
        "round ratio",
        "lost",
        "peak MiB",
        "agent ns/rec"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(times[i].clone());
        let round_ratio = median(times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect());
        let lost: u64 = results[i].iter().map(|r| r.lost).sum();
        let rss = results[i].iter().map(|r| r.peak_rss_mib).max().unwrap_or(0);
        let agent: Vec<f64> = results[i]
            .iter()
            .map(|r| r.agent_ns_per_record)
            .filter(|&n| n > 0.0)
            .collect();
        println!(
            "{name:<30} {:>10.0} {:>7.2} us {:>6.2}x {:>11.2}x {:>6} {:>9} {:>12}",
            1.0 / m,
            m * 1e6,
            m / base,
            round_ratio,
            lost,
            if rss > 0 { rss.to_string() } else { "-".into() },
            if agent.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", median(agent))
            }
        );
    }
    snapshot(bin)?;
    watch(bin)
}

/// `memtrace snapshot` of every process: wall time, median of five.
fn snapshot(bin: &Path) -> Result<()> {
    let mut times = Vec::new();
    let mut processes = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let out = crate::output(
            Command::new(bin.join("memtrace")).args(["snapshot", "--format", "json"]),
        )?;
        times.push(started.elapsed().as_secs_f64());
        let v: serde_json::Value = serde_json::from_str(&out)?;
        processes = v["processes"].as_array().map_or(0, Vec::len);
    }
    println!(
        "\nmemtrace snapshot of every process ({processes} processes, with smaps by kind): {:.0} ms (median of 5, whole command)",
        median(times) * 1e3
    );
    Ok(())
}

/// `memtrace watch` of every process and slab cache at `-i 1s` for 30 s: its CPU share.
fn watch(bin: &Path) -> Result<()> {
    let out = crate::output(
        Command::new(bin.join("memtrace")).args(["watch", "-d", "30s", "-q", "--format", "json"]),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    println!(
        "memtrace watch, every process and slab cache at -i 1s for 30 s ({} processes, {} caches): {:.2}% of a CPU, peak RSS {} MiB",
        v["processes"],
        v["caches"],
        v["cpu_percent"].as_f64().unwrap_or(0.0),
        v["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20
    );
    Ok(())
}
