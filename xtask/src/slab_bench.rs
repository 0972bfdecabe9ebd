//! The `memtrace slab` benchmark: a loop creating and closing pipes (every pipe is about nine
//! slab allocations and nine frees), untraced and under system-wide tracers, interleaved; and
//! the agent's memory with a million outstanding objects.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::median;

/// bpftrace keeping every outstanding allocation by address, as bcc's memleak does in kernel
/// mode (call site only). Its maps default to 4096 keys; the run raises that.
const BPFTRACE_BY_ADDRESS: &str = "\
tracepoint:kmem:kmalloc { @out[args->ptr] = args->call_site; }
tracepoint:kmem:kmem_cache_alloc { @out[args->ptr] = args->call_site; }
tracepoint:kmem:kfree { delete(@out[args->ptr]); }
tracepoint:kmem:kmem_cache_free { delete(@out[args->ptr]); }
END { clear(@out); }";

#[derive(Clone, Copy)]
enum Tracer {
    None,
    Memtrace(&'static [&'static str]),
    Bpftrace,
}

/// A tracer running system-wide in the background.
struct Running {
    child: Child,
}

impl Running {
    fn start(bin: &Path, tracer: Tracer) -> Result<Option<Self>> {
        let mut child = match tracer {
            Tracer::None => return Ok(None),
            Tracer::Memtrace(flags) => Command::new(bin.join("memtrace"))
                .args(["slab", "--format", "json", "--top", "3"])
                .args(flags)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting memtrace slab")?,
            Tracer::Bpftrace => Command::new("bpftrace")
                .args(["-e", BPFTRACE_BY_ADDRESS])
                .env("BPFTRACE_MAP_KEYS_MAX", "1048576")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting bpftrace")?,
        };
        // Both say when their probes are attached: memtrace on stderr, bpftrace on stdout.
        let mut line = String::new();
        match tracer {
            Tracer::Memtrace(_) => {
                BufReader::new(child.stderr.as_mut().context("stderr")?).read_line(&mut line)?;
            }
            _ => {
                BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
            }
        }
        if line.is_empty() {
            bail!("the tracer exited before attaching");
        }
        Ok(Some(Self { child }))
    }

    /// Stops the tracer with SIGINT; returns its stdout (memtrace's final report).
    fn stop(mut self) -> Result<String> {
        // SAFETY: kill takes a pid and a signal by value; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        self.child.wait()?;
        Ok(out)
    }
}

/// One run: (seconds per pipe, lost allocations, agent peak RSS in MiB; 0 where not known).
fn run_once(bin: &Path, tracer: Tracer, duration_ms: u64) -> Result<(f64, u64, u64)> {
    let running = Running::start(bin, tracer)?;
    let out = crate::output(
        Command::new(bin.join("memtrace-workload")).args(["pipe-churn", &duration_ms.to_string()]),
    )?;
    let per_s: f64 = out
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("pipes_per_s="))
        .context("no pipes_per_s")?
        .parse()?;
    let report = match running {
        Some(r) => r.stop()?,
        None => String::new(),
    };
    let (mut lost, mut rss) = (0, 0);
    if let Tracer::Memtrace(_) = tracer {
        let start = report.find('{').context("memtrace printed no report")?;
        let r: serde_json::Value = serde_json::from_str(&report[start..])?;
        lost = r["lost"]["events"].as_u64().unwrap_or(0);
        rss = r["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20;
    }
    Ok((1.0 / per_s, lost, rss))
}

pub fn bench(bin: &Path, runs: usize, bpftrace: bool) -> Result<()> {
    let mut configs: Vec<(&str, Tracer)> = vec![
        ("untraced", Tracer::None),
        ("memtrace slab (system-wide)", Tracer::Memtrace(&[])),
        ("memtrace slab --stacks", Tracer::Memtrace(&["--stacks"])),
    ];
    if bpftrace {
        configs.push(("bpftrace: outstanding by address", Tracer::Bpftrace));
    }
    let duration_ms = 3000;
    let mut times = vec![Vec::new(); configs.len()];
    let mut lost = vec![0u64; configs.len()];
    let mut rss = vec![0u64; configs.len()];
    for round in 0..runs {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            std::thread::sleep(Duration::from_secs(1));
            let (t, l, r) = run_once(bin, configs[i].1, duration_ms)?;
            times[i].push(t);
            lost[i] += l;
            rss[i] = rss[i].max(r);
        }
    }
    let base = median(times[0].clone());
    println!(
        "\npipe-churn (create + close pipes, {duration_ms} ms per run): {runs} rounds, interleaved"
    );
    println!(
        "{:<36} {:>10} {:>10} {:>7} {:>12} {:>6} {:>9}",
        "configuration", "pipes/s", "per pipe", "ratio", "round ratio", "lost", "peak MiB"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(times[i].clone());
        let round_ratio = median(times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect());
        println!(
            "{name:<36} {:>10.0} {:>7.2} us {:>6.2}x {:>11.2}x {:>6} {:>9}",
            1.0 / m,
            m * 1e6,
            m / base,
            round_ratio,
            lost[i],
            if rss[i] > 0 {
                rss[i].to_string()
            } else {
                "-".into()
            }
        );
    }
    outstanding_million(bin)
}

/// The agent's memory and report time with a million outstanding objects: 340,000 eventfds
/// held (each a context, a file and its security blob).
fn outstanding_million(bin: &Path) -> Result<()> {
    let out = crate::output(
        Command::new(bin.join("memtrace"))
            .args(["slab", "--format", "json", "--max-tracked", "2000000", "--"])
            .arg(bin.join("memtrace-workload"))
            .args(["eventfds", "340000", "3000", "0"]),
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            println!("\noutstanding objects: run failed ({e:#})");
            return Ok(());
        }
    };
    // The final report comes after the workload closed everything; what matters is the peak.
    let start = out.find("\n{").map_or(0, |i| i + 1);
    let r: serde_json::Value = serde_json::from_str(&out[start..])?;
    println!(
        "\n340,000 eventfds held (~1.02M outstanding objects): agent peak RSS {} MiB, lost {}",
        r["agent"]["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20,
        r["lost"]["events"]
    );
    Ok(())
}
