//! `cargo xtask`: setup (toolchain pieces), demo, test and bench for memtrace.
//!
//! Every command runs `setup` first, which is idempotent and quick once done, so a fresh machine
//! needs nothing but `cargo xtask demo` or `cargo xtask test`.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod background;
mod procmem_bench;
mod slab_bench;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the eBPF programs needs: nightly rust-src and bpf-linker.
    Setup,
    /// Build (release) and run `memtrace faults` on the bundled demo workload, or on CMD.
    Demo {
        /// A command to trace instead of the demo workload.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run the whole test suite: unit tests and the root-only integration tests.
    Test,
    /// Overhead of `memtrace faults` on page-fault-heavy workloads and of `memtrace slab` on a
    /// slab-heavy one, against untraced runs.
    Bench {
        /// Pages first-touched per run.
        #[arg(long, default_value_t = 1_000_000)]
        pages: u64,
        /// Rounds (each runs every configuration once; medians are reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Only this table: `anon` (the reference), `anon-recycle` (worst case), `slab`
        /// (`memtrace slab` on a pipe create/close loop) or `vma` (`memtrace vma` on a loop of
        /// large mallocs, `snapshot` and `watch` costs).
        #[arg(long)]
        only: Option<String>,
    },
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Puts cargo's bin directory on PATH for everything started from here (bpf-linker lives there).
fn extend_path() {
    let bin = cargo_bin_dir();
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == bin) {
        let mut paths = vec![bin];
        paths.extend(env::split_paths(&path));
        if let Ok(joined) = env::join_paths(paths) {
            // SAFETY: xtask is single-threaded at this point; nothing reads the environment
            // concurrently.
            unsafe { env::set_var("PATH", joined) };
        }
    }
}

fn setup() -> Result<()> {
    extend_path();
    // 1. The nightly toolchain builds the eBPF crate with -Z build-std=core.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // 2. bpf-linker, linked against the nightly toolchain's own libLLVM (the system has no
    //    LLVM of the same major version).
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        let lib = sysroot.join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libLLVM.so."))
            })
            .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
        let file = llvm
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly -> feature llvm-22
        let major = file
            .trim_start_matches("libLLVM.so.")
            .split('.')
            .next()
            .unwrap_or("22")
            .to_string();
        let prefix = env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".cache/memtrace/llvm");
        let prefix_lib = prefix.join("lib");
        std::fs::create_dir_all(&prefix_lib)?;
        for name in [file.as_str(), "libLLVM.so"] {
            let link = prefix_lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix))?;
    }
    // 3. tracefs (memtrace mounts it too; doing it here makes `perf`/`bpftrace` checks work).
    if !Path::new("/sys/kernel/tracing/events").is_dir() && is_root() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0")
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root_dir());
    c
}

fn test() -> Result<()> {
    setup()?;
    if !is_root() {
        bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
    }
    run(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "memtrace-ebpf",
        "--bins",
    ]))?;
    run(cargo().args(["test", "--workspace", "--exclude", "memtrace-ebpf"]))
}

/// Builds memtrace and the workloads optimized; returns the directory holding them.
fn build_release() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "memtrace",
        "-p",
        "memtrace-tests",
    ]))?;
    Ok(root_dir().join("target/release"))
}

fn demo(command: Vec<String>) -> Result<()> {
    setup()?;
    let bin = build_release()?;
    let mut cmd = Command::new(bin.join("memtrace"));
    cmd.args(["faults", "--hist", "--top", "5", "--"]);
    if command.is_empty() {
        cmd.arg(bin.join("memtrace-workload"))
            .args(["demo", "/var/tmp"]);
    } else {
        cmd.args(command);
    }
    run(&mut cmd)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What runs the workload in a benchmark row.
#[derive(Clone, Copy)]
enum Runner {
    Untraced,
    /// `memtrace faults` with these extra flags, tracing the workload (`-- CMD`).
    Memtrace(&'static [&'static str]),
    /// `memtrace faults` with these extra flags, system-wide, started before the workload.
    MemtraceSystemWide(&'static [&'static str]),
    /// bpftrace counting the workload's faults by user stack: the yardstick the field has.
    Bpftrace,
}

const BPFTRACE_PROGRAM: &str = "software:minor-faults:1 /pid == cpid/ { @[ustack] = count(); }";

/// One run: returns (touch-phase seconds, lost records, agent CPU ns per record; 0 where the
/// runner cannot say).
fn bench_run(bin: &Path, workload: &str, pages: u64, runner: Runner) -> Result<(f64, u64, f64)> {
    let workload_bin = bin.join("memtrace-workload");
    let pages = pages.to_string();
    let out = match runner {
        Runner::Untraced => output(Command::new(&workload_bin).args([workload, &pages]))?,
        Runner::Bpftrace => {
            let cmd_line = format!("{} {workload} {pages}", workload_bin.display());
            output(Command::new("bpftrace").args(["-e", BPFTRACE_PROGRAM, "-c", &cmd_line]))?
        }
        Runner::Memtrace(flags) => output(
            Command::new(bin.join("memtrace"))
                .args(["faults", "--format", "json"])
                .args(flags)
                .arg("--")
                .arg(&workload_bin)
                .args([workload, &pages]),
        )?,
        Runner::MemtraceSystemWide(flags) => {
            let mut args = vec!["faults"];
            args.extend_from_slice(flags);
            let leaked: &'static [&'static str] = Box::leak(args.into_boxed_slice());
            let tracer = background::start(bin, background::Tracer::Memtrace(leaked))?;
            let workload_out = output(Command::new(&workload_bin).args([workload, &pages]))?;
            let report = tracer.map(|t| t.stop()).transpose()?.unwrap_or_default();
            format!("{workload_out}\n{report}")
        }
    };
    let seconds = touch_seconds(&out)?;
    let (lost, agent_ns) = match runner {
        Runner::Memtrace(_) | Runner::MemtraceSystemWide(_) => {
            let report = memtrace_report(&out)?;
            (
                report["lost"]["events"]
                    .as_u64()
                    .context("report without lost.events")?,
                report["agent"]["cpu_ns_per_record"].as_f64().unwrap_or(0.0),
            )
        }
        Runner::Untraced | Runner::Bpftrace => (0, 0.0),
    };
    Ok((seconds, lost, agent_ns))
}

/// The touch-phase time from the workload's report line.
fn touch_seconds(out: &str) -> Result<f64> {
    Ok(workload_number(out, "touch_ns")? / 1e9)
}

/// The number after `key=` in a workload's `key=value ...` output.
pub(crate) fn workload_number(out: &str, key: &str) -> Result<f64> {
    let prefix = format!("{key}=");
    Ok(out
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(prefix.as_str()))
        .with_context(|| format!("no {key}= in the workload's output"))?
        .parse()?)
}

/// memtrace's JSON report in `out`: all of it, or what follows other programs' lines.
pub(crate) fn memtrace_report(out: &str) -> Result<serde_json::Value> {
    let start = if out.starts_with('{') {
        0
    } else {
        out.find("\n{").context("memtrace printed no JSON report")? + 1
    };
    Ok(serde_json::from_str(&out[start..])?)
}

type BenchConfig = (&'static str, Runner);

/// The baseline every table's ratios are taken against (first in every table).
const UNTRACED: BenchConfig = ("untraced", Runner::Untraced);
/// What a user gets from `memtrace faults`: stacks, latency and mapping classification.
const MEMTRACE_DEFAULT: BenchConfig = (
    "memtrace faults (stacks + latency + mappings)",
    Runner::Memtrace(&[]),
);
/// The same, system-wide, started before the workload.
const MEMTRACE_SYSTEM_WIDE: BenchConfig = (
    "memtrace faults, system-wide",
    Runner::MemtraceSystemWide(&[]),
);

/// Runs every configuration once per round, rotating the order each round so that slow phases
/// of a noisy machine (a VM whose host reclaims freed memory makes fresh pages cost 2-10 us)
/// fall on every configuration alike, with the same pause before every run. Prints median time, per-fault cost, the ratio of medians
/// and the median of per-round ratios against the untraced run.
fn bench_table(
    bin: &Path,
    workload: &str,
    pages: u64,
    runs: usize,
    configs: &[BenchConfig],
) -> Result<()> {
    let mut times = vec![Vec::new(); configs.len()];
    let mut lost = vec![0u64; configs.len()];
    let mut agent_ns = vec![Vec::new(); configs.len()];
    for round in 0..runs {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            // Every run starts from the same state: the previous run's memory freed and given
            // time to settle (a tracer's own start-up would otherwise be a pause only traced
            // runs get).
            std::thread::sleep(std::time::Duration::from_secs(2));
            let (t, l, a) = bench_run(bin, workload, pages, configs[i].1)?;
            times[i].push(t);
            lost[i] += l;
            agent_ns[i].push(a);
        }
    }
    let base = median(times[0].clone());
    println!("\n{workload} {pages}: {runs} rounds, configurations interleaved");
    println!(
        "{:<46} {:>9} {:>10} {:>7} {:>12} {:>6} {:>13}  runs (s)",
        "configuration", "median", "per fault", "ratio", "round ratio", "lost", "agent ns/rec"
    );
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(times[i].clone());
        let round_ratio = median(times[i].iter().zip(&times[0]).map(|(t, b)| t / b).collect());
        let all: Vec<String> = times[i].iter().map(|t| format!("{t:.2}")).collect();
        let agent = median(agent_ns[i].clone());
        let agent = if agent > 0.0 {
            format!("{agent:.0}")
        } else {
            "-".into()
        };
        println!(
            "{name:<46} {m:>7.3} s {:>7.2} us {:>6.2}x {:>11.2}x {:>6} {agent:>13}  {}",
            m * 1e6 / pages as f64,
            m / base,
            round_ratio,
            lost[i],
            all.join(" ")
        );
    }
    Ok(())
}

/// The machine's maximum fault rate: one `anon-recycle` per CPU at once, untraced and under
/// system-wide `memtrace faults`. Prints the fault rate, what the agent lost (the floor is 0)
/// and its CPU per record.
fn bench_both_cpus(bin: &Path, pages: u64, runs: usize) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let configs: [(&str, background::Tracer); 3] = [
        ("untraced", background::Tracer::None),
        (
            "memtrace faults, system-wide",
            background::Tracer::Memtrace(&["faults"]),
        ),
        (
            "memtrace faults --every-fault-latency",
            background::Tracer::Memtrace(&["faults", "--every-fault-latency"]),
        ),
    ];
    let mut rates = vec![Vec::new(); configs.len()];
    let mut lost = vec![0u64; configs.len()];
    let mut agent = vec![Vec::new(); configs.len()];
    let pages_arg = pages.to_string();
    for round in 0..runs {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            std::thread::sleep(std::time::Duration::from_secs(2));
            let tracer = background::start(bin, configs[i].1)?;
            let started = std::time::Instant::now();
            let children = (0..cpus)
                .map(|_| {
                    Command::new(bin.join("memtrace-workload"))
                        .args(["anon-recycle", &pages_arg])
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .context("starting memtrace-workload")
                })
                .collect::<Result<Vec<_>>>()?;
            for mut child in children {
                child.wait()?;
            }
            let seconds = started.elapsed().as_secs_f64();
            rates[i].push((cpus as u64 * pages) as f64 / seconds);
            if let Some(t) = tracer {
                let report = memtrace_report(&t.stop()?)?;
                lost[i] += report["lost"]["events"].as_u64().unwrap_or(0);
                agent[i].push(report["agent"]["cpu_ns_per_record"].as_f64().unwrap_or(0.0));
            }
        }
    }
    println!(
        "\nboth CPUs: {cpus} x anon-recycle {pages} at once, {runs} rounds (wall time of the slowest, \
         from start to exit)"
    );
    println!(
        "{:<46} {:>12} {:>7} {:>6} {:>13}",
        "configuration", "faults/s", "ratio", "lost", "agent ns/rec"
    );
    let base = median(rates[0].clone());
    for (i, (name, _)) in configs.iter().enumerate() {
        let rate = median(rates[i].clone());
        let a = if agent[i].is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", median(agent[i].clone()))
        };
        println!(
            "{name:<46} {rate:>12.0} {:>6.2}x {:>6} {a:>13}",
            base / rate,
            lost[i]
        );
    }
    Ok(())
}

/// Is bpftrace on PATH? Installs Debian's package when it is not (the comparison the bench
/// prints is against the tool the field reaches for).
fn bpftrace_available() -> bool {
    let works = || {
        Command::new("bpftrace")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return true;
    }
    println!("xtask: installing bpftrace (apt-get) for the comparison rows");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "bpftrace"]) && works()
}

fn bench(pages: u64, runs: usize, only: Option<&str>) -> Result<()> {
    if let Some(w) = only {
        if !["anon", "anon-recycle", "slab", "vma"].contains(&w) {
            bail!("--only takes anon, anon-recycle, slab or vma, not {w:?}");
        }
    }
    let wanted = |workload: &str| only.is_none_or(|w| w == workload);
    setup()?;
    if !is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let bin = build_release()?;
    println!(
        "memtrace overhead, touch-phase wall time of memtrace-workload; machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let bpftrace = bpftrace_available();
    if !bpftrace {
        println!("(bpftrace could not be installed: its comparison rows are skipped)");
    }
    let with_bpftrace = |mut configs: Vec<BenchConfig>| {
        if bpftrace {
            configs.push(("bpftrace: count by ustack", Runner::Bpftrace));
        }
        configs
    };
    // The reference: first touch of fresh anonymous memory, as a program would fault it.
    if wanted("anon") {
        bench_table(
            &bin,
            "anon",
            pages,
            runs,
            &with_bpftrace(vec![UNTRACED, MEMTRACE_DEFAULT, MEMTRACE_SYSTEM_WIDE]),
        )?;
    }
    if wanted("slab") {
        slab_bench::bench(&bin, runs, bpftrace)?;
    }
    if wanted("vma") {
        procmem_bench::bench(&bin, runs, bpftrace)?;
    }
    if !wanted("anon-recycle") {
        return Ok(());
    }
    bench_both_cpus(&bin, pages, runs)?;
    // The worst case for a tracer: the cheapest fault there is (recycled, host-backed pages).
    // The rows switch pieces off one at a time, so the table is also the cost breakdown.
    bench_table(
        &bin,
        "anon-recycle",
        pages,
        runs,
        &with_bpftrace(vec![
            UNTRACED,
            MEMTRACE_DEFAULT,
            MEMTRACE_SYSTEM_WIDE,
            (
                "memtrace faults --no-stacks",
                Runner::Memtrace(&["--no-stacks"]),
            ),
            (
                "memtrace faults --no-stacks (system-wide)",
                Runner::MemtraceSystemWide(&["--no-stacks"]),
            ),
            (
                "memtrace faults --counts-only",
                Runner::Memtrace(&["--counts-only"]),
            ),
            (
                "memtrace faults --every-fault-latency",
                Runner::Memtrace(&["--every-fault-latency"]),
            ),
            (
                "before: records at the kernel's accounting",
                Runner::Memtrace(&["--records-at-accounting"]),
            ),
        ]),
    )
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Demo { command } => demo(command),
        Cmd::Test => test(),
        Cmd::Bench { pages, runs, only } => bench(pages, runs, only.as_deref()),
    }
}
