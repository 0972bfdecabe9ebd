//! The `memtrace slab` benchmark: a loop creating and closing pipes (every pipe is about nine
//! slab allocations and nine frees), untraced and under system-wide tracers, interleaved; and
//! the agent's memory with a million outstanding objects.
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    background::{start, Tracer},
    median,
};

/// bpftrace keeping every outstanding allocation by address, as bcc's memleak does in kernel
/// mode (call site only). Its maps default to 4096 keys; the run raises that.
const BPFTRACE_BY_ADDRESS: &str = "\
tracepoint:kmem:kmalloc { @out[args->ptr] = args->call_site; }
tracepoint:kmem:kmem_cache_alloc { @out[args->ptr] = args->call_site; }
tracepoint:kmem:kfree { delete(@out[args->ptr]); }
tracepoint:kmem:kmem_cache_free { delete(@out[args->ptr]); }
END { clear(@out); }";

/// What a run measured.
#[derive(Clone, Copy, Default)]
struct Run {
    seconds_per_pipe: f64,
    lost: u64,
    peak_rss_mib: u64,
    /// Slab allocations and frees memtrace counted per pipe (0 for other tracers).
    events_per_pipe: f64,
}

/// One run of the pipe loop passing `bytes` through each pipe, under `tracer`.
fn run_once(bin: &Path, tracer: Tracer, duration_ms: u64, bytes: usize) -> Result<Run> {
    let running = start(bin, tracer)?;
    let out = crate::output(Command::new(bin.join("memtrace-workload")).args([
        "pipe-churn",
        &duration_ms.to_string(),
        &bytes.to_string(),
    ]))?;
    let pipes = crate::workload_number(&out, "pipes")?;
    let per_s = crate::workload_number(&out, "pipes_per_s")?;
    let report = match running {
        Some(r) => r.stop()?,
        None => String::new(),
    };
    let mut run = Run {
        seconds_per_pipe: 1.0 / per_s,
        ..Run::default()
    };
    if let Tracer::Memtrace(_) = tracer {
        let r = crate::memtrace_report(&report)?;
        run.lost = r["lost"]["events"].as_u64().unwrap_or(0);
        run.peak_rss_mib = r["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20;
        let t = &r["totals"];
        let events = t["allocs"].as_u64().unwrap_or(0) + t["frees"].as_u64().unwrap_or(0);
        run.events_per_pipe = events as f64 / pipes;
    }
    Ok(run)
}

pub fn bench(bin: &Path, runs: usize, bpftrace: bool) -> Result<()> {
    let mut configs: Vec<(&str, Tracer)> = vec![
        ("untraced", Tracer::None),
        ("memtrace slab (system-wide)", Tracer::Memtrace(&["slab"])),
        (
            "memtrace slab --stacks",
            Tracer::Memtrace(&["slab", "--stacks"]),
        ),
    ];
    if bpftrace {
        configs.push((
            "bpftrace: outstanding by address",
            Tracer::Bpftrace(BPFTRACE_BY_ADDRESS, &[("BPFTRACE_MAP_KEYS_MAX", "1048576")]),
        ));
    }
    // Bare create/close, and with 60 KB through each pipe (about two million slab events a
    // second on this machine kind, the rate of a busy server).
    for bytes in [0, 60_000] {
        table(bin, runs, bytes, &configs)?;
    }
    outstanding_million(bin)
}

fn table(bin: &Path, runs: usize, bytes: usize, configs: &[(&str, Tracer)]) -> Result<()> {
    let duration_ms = 3000;
    let mut results = vec![Vec::new(); configs.len()];
    for round in 0..runs {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            std::thread::sleep(Duration::from_secs(1));
            results[i].push(run_once(bin, configs[i].1, duration_ms, bytes)?);
        }
    }
    let times: Vec<Vec<f64>> = results
        .iter()
        .map(|r| r.iter().map(|r| r.seconds_per_pipe).collect())
        .collect();
    let base = median(times[0].clone());
    let counted: Vec<f64> = results
        .iter()
        .flatten()
        .map(|r| r.events_per_pipe)
        .filter(|&e| e > 0.0)
        .collect();
    let events_per_pipe = if counted.is_empty() {
        0.0
    } else {
        median(counted)
    };
    println!(
        "\npipe-churn, {bytes} bytes through each pipe ({duration_ms} ms runs, {runs} rounds, \
         interleaved): {events_per_pipe:.1} slab events per pipe, {:.1}M events/s untraced",
        events_per_pipe / base / 1e6
    );
    println!(
        "{:<36} {:>10} {:>10} {:>7} {:>12} {:>6} {:>9}",
        "configuration", "pipes/s", "per pipe", "ratio", "round ratio", "lost", "peak MiB"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(times[i].clone());
        let round_ratio = median(times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect());
        let lost: u64 = results[i].iter().map(|r| r.lost).sum();
        let rss = results[i].iter().map(|r| r.peak_rss_mib).max().unwrap_or(0);
        println!(
            "{name:<36} {:>10.0} {:>7.2} us {:>6.2}x {:>11.2}x {:>6} {:>9}",
            1.0 / m,
            m * 1e6,
            m / base,
            round_ratio,
            lost,
            if rss > 0 { rss.to_string() } else { "-".into() }
        );
    }
    Ok(())
}

/// The agent's memory with a million outstanding objects: 340,000 empty files created in a
/// tmpfs directory and held (each a dentry, an inode and their security blobs).
fn outstanding_million(bin: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("memtrace-bench-files-{}", std::process::id()));
    let dir = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm").join(dir.file_name().context("dir name")?)
    } else {
        dir
    };
    let out = crate::output(
        Command::new(bin.join("memtrace"))
            .args([
                "slab",
                "--format",
                "json",
                "-i",
                "2s",
                "--max-tracked",
                "2000000",
                "--",
            ])
            .arg(bin.join("memtrace-workload"))
            .args(["files", &dir.to_string_lossy(), "340000", "5000"]),
    )?;
    let mut peak = 0;
    let mut most = 0;
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let r: serde_json::Value = serde_json::from_str(line)?;
        peak = peak.max(r["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20);
        most = most.max(r["totals"]["objects"].as_u64().unwrap_or(0));
    }
    println!(
        "\n340,000 tmpfs files held: at most {most} outstanding objects in a report; agent peak RSS {peak} MiB"
    );
    Ok(())
}
