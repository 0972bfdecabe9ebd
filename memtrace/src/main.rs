//! The `memtrace` command line: a thin layer over the library.
mod output;

use std::{io::Write as _, ops::ControlFlow, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use memtrace::{
    analysis::{
        slab::{check_cache_names, default_max_tracked, slab_max_sites, SLAB_MAX_STACKS},
        FaultsAnalysis, SlabAnalysis, SlabReportOptions, VmaAnalysis,
    },
    engine::{self, RunOptions, Target},
    loader::{SlabOptions, TracerOptions},
    procmem,
    report::{Format, ReportOptions},
    slab::GroupBy,
};
use output::{Delivery, ReportSink};

#[derive(Parser)]
#[command(
    name = "memtrace",
    version,
    about = "eBPF page-fault and allocation tracer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Major/minor page faults per process, thread and callsite, with mapping class, access type
    /// and latency histograms. No target: the whole system.
    Faults(FaultsArgs),
    /// Outstanding kernel slab objects (kmalloc, kmem_cache_alloc) by callsite, cache, process
    /// or stack, with ages, growth and /proc/slabinfo beside them. No target: the whole system.
    Slab(SlabArgs),
    /// mmap, munmap, mremap and brk per callsite: what each still holds mapped (address-space
    /// leaks: VIRT grows, RES need not), by kind of memory, with ages. No target: the whole
    /// system.
    Vma(VmaArgs),
    /// VSS, RSS, PSS, USS and swap per process, by kind of memory (from /proc: no eBPF, no
    /// root needed for your own processes). No pid: every process by USS, and the system's
    /// figures from /proc/meminfo.
    Snapshot(SnapshotArgs),
    /// Samples process and slab memory over time and flags steady growth (a leak), with its
    /// rate and how sure it is. No pid: every process and every slab cache.
    Watch(WatchArgs),
    /// What this kernel allows and which probes memtrace will use.
    Check {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// The longest `-d`/`-i`: ten years, beyond any real run and far from overflowing a clock.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("'{s}': a duration must be greater than zero"));
    }
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = num
        .parse()
        .map_err(|_| format!("bad duration '{s}' (e.g. 10s, 500ms, 2m)"))?;
    let unit_secs = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("bad duration unit in '{s}' (ms, s, m, h)")),
    };
    let secs = value * unit_secs;
    if secs <= 0.0 {
        return Err(format!("'{s}': a duration must be greater than zero"));
    }
    if secs < 0.001 {
        return Err(format!("'{s}' is too short (at least 1ms)"));
    }
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("'{s}' is too long (at most 87600h, ten years)"))
}

/// The largest ring buffer: 1 GiB (the size is a u32 count of bytes, and a power of two).
const MAX_RINGBUF_MB: u32 = 1024;

fn parse_ringbuf_mb(s: &str) -> Result<u32, String> {
    let mb: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a size in MiB"))?;
    if (1..=MAX_RINGBUF_MB).contains(&mb) && mb.is_power_of_two() {
        Ok(mb)
    } else {
        Err(format!(
            "the ring buffer size must be a power of two from 1 to {MAX_RINGBUF_MB} (MiB)"
        ))
    }
}

/// What every tracing subcommand takes: targets, run length, report layout and destination.
#[derive(Args)]
struct RunArgs {
    /// Trace this process (all its threads; a thread's id stands for its process); repeat for
    /// several.
    #[arg(short, long = "pid", conflicts_with = "command")]
    pid: Vec<u32>,
    /// Stop after this long (e.g. 10s, 500ms, 2m).
    #[arg(short, long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print a report every interval meanwhile, of that interval alone; the final report has
    /// the whole run.
    #[arg(short, long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Rows in the table and in JSON (folded output has every row).
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// table, one JSON document (JSON Lines with -i: one per report), or folded stacks.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Write the reports to this file (created or truncated) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Ring buffer size in MiB (a power of two, at most 1024).
    #[arg(long, default_value_t = 16, value_parser = parse_ringbuf_mb)]
    ringbuf_mb: u32,
    /// Command to start and trace, with its children.
    #[arg(last = true)]
    command: Vec<String>,
}

impl RunArgs {
    /// The engine's options for a run with these arguments and `tracer`.
    fn run_options(&self, tracer: TracerOptions) -> RunOptions {
        RunOptions {
            target: self.target(),
            duration: self.duration,
            interval: self.interval,
            tracer,
        }
    }

    fn ringbuf_bytes(&self) -> u32 {
        self.ringbuf_mb.saturating_mul(1024 * 1024)
    }

    /// How reports are laid out; `threads` and `hist` where the subcommand has them.
    fn report_options(&self, threads: bool, hist: bool) -> ReportOptions {
        ReportOptions {
            format: self.format,
            top: self.top,
            threads,
            hist,
        }
    }

    fn target(&self) -> Target {
        if !self.command.is_empty() {
            Target::Command(self.command.clone())
        } else if !self.pid.is_empty() {
            Target::Pids(self.pid.clone())
        } else {
            Target::System
        }
    }
}

#[derive(Args)]
struct FaultsArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Per-thread counts in the table.
    #[arg(long)]
    threads: bool,
    /// Draw log2 latency histograms.
    #[arg(long)]
    hist: bool,
    /// Skip stack capture.
    #[arg(long)]
    no_stacks: bool,
    /// Measure the latency of every minor fault (default: a random sample, one in
    /// --latency-period on average, taken in 10 ms windows of every 100 ms; every major
    /// fault is always measured).
    #[arg(long, conflicts_with_all = ["latency_period", "counts_only"])]
    every_fault_latency: bool,
    /// Measure the latency of one minor fault in N (1: every one, 0: none).
    #[arg(long, value_name = "N", default_value_t = memtrace::loader::DEFAULT_LATENCY_PERIOD)]
    latency_period: u32,
    /// Counts only: no stacks and no minor-fault latency (the cheapest mode; counts per
    /// process, thread, mapping class and access type stay exact).
    #[arg(long, conflicts_with = "latency_period")]
    counts_only: bool,
    /// Walk the user stack on every fault instead of reusing repeats (for comparison).
    #[arg(long, hide = true)]
    no_stack_cache: bool,
    /// Attach classic tracepoints where raw tracepoints would work (for comparison).
    #[arg(long, hide = true)]
    classic_tracepoints: bool,
    /// Send fault records at the kernel's accounting, every fault with its latency, as
    /// before records at entry (for comparison; also the fallback without BTF).
    #[arg(long, hide = true)]
    records_at_accounting: bool,
}

#[derive(Args)]
struct SlabArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Group outstanding objects by allocating callsite (and cache), cache, process or
    /// kernel stack (needs --stacks).
    #[arg(long, value_enum, default_value = "callsite")]
    by: GroupBy,
    /// Only objects older than this (leak candidates), e.g. 30s. Young objects still count in
    /// the totals and the cache table.
    #[arg(long, value_parser = parse_duration)]
    min_age: Option<Duration>,
    /// Only this cache (a name from /proc/slabinfo, an alias, or a kmalloc class such as
    /// kmalloc-cg-192); repeat for several.
    #[arg(long = "cache", value_name = "NAME")]
    caches: Vec<String>,
    /// Kernel stacks of allocations (a walk serves a random run of the next allocations at
    /// the same call site on that CPU: an unbiased sample at a fraction of the cost).
    #[arg(long)]
    stacks: bool,
    /// User stacks of the allocating tasks: which code of theirs made the kernel allocate.
    #[arg(long)]
    user_stacks: bool,
    /// Draw each row's age histogram.
    #[arg(long)]
    hist: bool,
    /// Also page allocations (kmem:mm_page_alloc/free; no call site: add --stacks).
    #[arg(long)]
    pages: bool,
    /// Also per-CPU allocations (percpu:percpu_alloc_percpu/free_percpu; bytes per CPU).
    #[arg(long)]
    percpu: bool,
    /// Also vmalloc areas (vmalloc:alloc_vmap_area/free_vmap_area_noflush; no call site).
    #[arg(long)]
    vmalloc: bool,
    /// Outstanding objects tracked at most. The kernel table is preallocated: about 128 bytes
    /// an object (a million: 128 MiB). Default: a million, or fewer under ~13 GiB of memory
    /// (1% of it at most).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    max_tracked: Option<u32>,
    /// Attach classic tracepoints where raw tracepoints would work (for comparison).
    #[arg(long, hide = true)]
    classic_tracepoints: bool,
}

#[derive(Args)]
struct VmaArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Also count, per callsite, the pages of its mappings that were touched (the RSS it
    /// caused) against what it only reserved.
    #[arg(long)]
    faults: bool,
}

#[derive(Args)]
struct SnapshotArgs {
    /// This process only (a thread's id stands for its process); repeat for several.
    #[arg(short, long = "pid")]
    pid: Vec<u32>,
    /// Rows in the table (0: all).
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Each process's memory by kind in the table (always with -p; JSON always has it).
    #[arg(long)]
    kinds: bool,
    /// table, or one JSON document.
    #[arg(long, value_enum, default_value = "table")]
    format: PlainFormat,
    /// Write the report to this file (created or truncated) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct WatchArgs {
    /// Watch this process (exact USS from smaps_rollup); repeat for several. Without one:
    /// every process (resident private memory from statm) and every slab cache.
    #[arg(short, long = "pid")]
    pid: Vec<u32>,
    /// Time between samples.
    #[arg(short, long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// The trend window: growth must hold over a third of it at least, steadily.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    window: Duration,
    /// Stop after this long (default: until Ctrl-C, or every watched process exits).
    #[arg(short, long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Draw the sampled series to this SVG file at the end.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// table, or one JSON document (the live lines go to stderr either way).
    #[arg(long, value_enum, default_value = "table")]
    format: PlainFormat,
    /// Write the summary to this file (created or truncated) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// No live line per sample.
    #[arg(short, long)]
    quiet: bool,
    /// Once something grows, trace it and name the code responsible: page faults of a
    /// process whose USS grows, its mmap/munmap/brk for address space, the cache's
    /// allocations for slab (needs root).
    #[arg(long)]
    trace: bool,
    /// How long each --trace runs (at most until -d).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    trace_for: Duration,
    /// Also flag reclaimable slab caches (dentry, inodes, buffer_head: they grow with the
    /// page cache and shrink under memory pressure).
    #[arg(long)]
    include_reclaimable: bool,
}

/// Layouts of the reports that have no stacks to fold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PlainFormat {
    Table,
    Json,
}

impl From<PlainFormat> for Format {
    fn from(f: PlainFormat) -> Self {
        match f {
            PlainFormat::Table => Format::Table,
            PlainFormat::Json => Format::Json,
        }
    }
}

/// memtrace's own exit codes; with `-- CMD` a run otherwise exits with the command's status.
const EXIT_ERROR: u8 = 1;
const EXIT_NO_SUCH_PROCESS: u8 = 3;
const EXIT_NOT_ROOT: u8 = 77;
const EXIT_CANNOT_EXECUTE: u8 = 126;
const EXIT_COMMAND_NOT_FOUND: u8 = 127;
/// The reader of the reports went away: the status of a process killed by SIGPIPE (128 + 13).
const EXIT_READER_GONE: u8 = 141;

fn faults(args: FaultsArgs) -> anyhow::Result<ExitCode> {
    let run = &args.run;
    let opts = run.run_options(TracerOptions {
        filter_pids: false,
        capture_stacks: !(args.no_stacks || args.counts_only),
        stack_cache: !args.no_stack_cache,
        ringbuf_bytes: run.ringbuf_bytes(),
        classic_tracepoints: args.classic_tracepoints,
        faults_at_entry: !args.records_at_accounting,
        latency_period: if args.every_fault_latency {
            1
        } else if args.counts_only {
            0
        } else {
            args.latency_period
        },
        ..TracerOptions::default()
    });
    let report = run.report_options(args.threads, args.hist);
    let mut analysis = FaultsAnalysis::new(report);
    run_analysis(&mut analysis, &opts, run, report)
}

fn slab(args: SlabArgs) -> anyhow::Result<ExitCode> {
    // Usage errors, reported and exited with as clap does (exit 2).
    let usage = |msg: String| -> ! {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        let kind = clap::error::ErrorKind::InvalidValue;
        match cli.find_subcommand_mut("slab") {
            Some(slab) => slab
                .clone()
                .bin_name("memtrace slab")
                .error(kind, msg)
                .exit(),
            None => cli.error(kind, msg).exit(),
        }
    };
    if args.by == GroupBy::Stack && !args.stacks && !args.user_stacks {
        usage("--by stack needs --stacks or --user-stacks".into());
    }
    if let Err(e) = check_cache_names(&args.caches) {
        usage(e);
    }
    let run = &args.run;
    let max_tracked = args.max_tracked.unwrap_or_else(default_max_tracked);
    let opts = run.run_options(TracerOptions {
        capture_stacks: false,
        ringbuf_bytes: run.ringbuf_bytes(),
        classic_tracepoints: args.classic_tracepoints,
        slab: SlabOptions {
            max_tracked,
            max_sites: slab_max_sites(),
            max_stacks: if args.stacks || args.user_stacks {
                SLAB_MAX_STACKS
            } else {
                0
            },
            kernel_stacks: args.stacks,
            user_stacks: args.user_stacks,
        },
        ..TracerOptions::default()
    });
    let report = run.report_options(false, args.hist);
    let mut analysis = SlabAnalysis::new(SlabReportOptions {
        by: args.by,
        min_age: args.min_age,
        caches: args.caches.clone(),
        top: run.top,
        format: run.format,
        stacks: args.stacks,
        user_stacks: args.user_stacks,
        max_tracked,
        pages: args.pages,
        percpu: args.percpu,
        vmalloc: args.vmalloc,
    });
    run_analysis(&mut analysis, &opts, run, report)
}

/// Runs an analysis on the engine and turns its end into memtrace's exit code.
fn run_analysis<A: engine::Analysis>(
    analysis: &mut A,
    opts: &RunOptions,
    run: &RunArgs,
    report: ReportOptions,
) -> anyhow::Result<ExitCode>
where
    A::Report: output::Report,
{
    let mut sink = ReportSink::open(run.output.as_deref(), report, opts.interval.is_some())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut write_error = None;
    let mut reader_gone = false;
    let outcome = runtime.block_on(engine::run(analysis, opts, |report, kind| {
        match sink.write(report, kind) {
            Ok(Delivery::Written) => ControlFlow::Continue(()),
            Ok(Delivery::ReaderGone) => {
                reader_gone = true;
                ControlFlow::Break(())
            }
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        }
    }))?;
    if let Some(e) = write_error {
        return Err(e);
    }
    if reader_gone {
        return Ok(ExitCode::from(EXIT_READER_GONE));
    }
    // Like time(1) and strace: the traced command's status is the run's.
    Ok(match outcome.command_exit_code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(EXIT_ERROR)),
        None => ExitCode::SUCCESS,
    })
}

fn vma(args: VmaArgs) -> anyhow::Result<ExitCode> {
    let run = &args.run;
    let mut analysis = VmaAnalysis::new(run.top, args.faults);
    log::debug!("raw sys_exit: {}", analysis.args_from_regs());
    let opts = run.run_options(TracerOptions {
        capture_stacks: false,
        vma_stacks: true,
        ringbuf_bytes: run.ringbuf_bytes(),
        ..TracerOptions::default()
    });
    let report = run.report_options(false, false);
    run_analysis(&mut analysis, &opts, run, report)
}

/// The processes `-p` names: a thread's id stands for its process (said, with what is
/// `doing` to it), as for the tracing commands.
fn processes_of(pids: &[u32], doing: &str) -> Vec<u32> {
    pids.iter()
        .map(|&pid| match procmem::thread_group(pid) {
            Some(tgid) if tgid != pid => {
                engine::say(format_args!(
                    "memtrace: {pid} is a thread of process {tgid}: {doing} the process"
                ));
                tgid
            }
            _ => pid,
        })
        .collect()
}

/// No process asked for could be read: exit as for a missing pid when none exists (or all are
/// kernel threads), else with the general error.
fn exit_for_unreadable(reasons: impl IntoIterator<Item = procmem::Unreadable>) -> ExitCode {
    let gone = reasons.into_iter().all(|r| {
        matches!(
            r,
            procmem::Unreadable::Gone | procmem::Unreadable::KernelThread
        )
    });
    ExitCode::from(if gone {
        EXIT_NO_SUCH_PROCESS
    } else {
        EXIT_ERROR
    })
}

fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let pids = processes_of(&args.pid, "reading");
    let pids = (!pids.is_empty()).then_some(pids.as_slice());
    let mut snap = procmem::snapshot(pids, true).context("reading /proc")?;
    snap.show_kinds |= args.kinds;
    let opts = ReportOptions {
        format: args.format.into(),
        top: args.top,
        threads: false,
        hist: false,
    };
    // Asked for by pid and none could be read: say why, and fail as a missing pid does.
    let none_read = pids.is_some() && snap.processes.is_empty();
    if none_read {
        for s in &snap.skipped {
            let _ = writeln!(
                std::io::stderr(),
                "memtrace: pid {}: {}",
                s.pid,
                s.reason.describe()
            );
        }
    }
    // A script reading JSON gets its document either way (with `skipped` saying why).
    if !none_read || args.format == PlainFormat::Json {
        let mut sink = ReportSink::open(args.output.as_deref(), opts, false)?;
        if sink.write(&snap, engine::ReportKind::Final)? == Delivery::ReaderGone {
            return Ok(ExitCode::from(EXIT_READER_GONE));
        }
    }
    if none_read {
        return Ok(exit_for_unreadable(snap.skipped.iter().map(|s| s.reason)));
    }
    Ok(ExitCode::SUCCESS)
}

fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    use memtrace::watch::{self, WatchError, WatchOptions, Watcher};
    if args.window < args.interval * 3 {
        use clap::CommandFactory as _;
        Cli::command()
            .error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "memtrace watch: --window must hold three samples at least (-i {:?}: \
                     --window {:?} or more)",
                    args.interval,
                    args.interval * 3
                ),
            )
            .exit();
    }
    // Tracing loads eBPF: refused now, not once something grows.
    if args.trace {
        memtrace::loader::check_root()?;
    }
    let pids = processes_of(&args.pid, "watching");
    let opts = WatchOptions {
        pids,
        interval: args.interval,
        window: args.window,
        duration: args.duration,
        thresholds: watch::Thresholds {
            reclaimable: args.include_reclaimable,
            ..watch::Thresholds::default()
        },
    };
    // Opened first: a bad path fails before a long watch, not after it.
    let report_opts = ReportOptions {
        format: args.format.into(),
        top: 0,
        threads: false,
        hist: false,
    };
    engine::install_stop_signals();
    let mut watcher = match Watcher::new(opts) {
        Ok(w) => w,
        Err(e @ WatchError::NothingToWatch(_)) => {
            let WatchError::NothingToWatch(refused) = &e;
            let _ = writeln!(std::io::stderr(), "memtrace: error: {e}");
            return Ok(exit_for_unreadable(refused.iter().map(|(_, r)| *r)));
        }
    };
    // Opened once there is something to watch (no empty files left by a refusal), and
    // before the watch, so a path that cannot be written fails at once, not after it.
    let mut sink = ReportSink::open(args.output.as_deref(), report_opts, false)?;
    let plot = match &args.plot {
        Some(path) => Some((
            path,
            std::fs::File::create(path)
                .with_context(|| format!("creating the plot file {}", path.display()))?,
        )),
        None => None,
    };
    let target = if args.pid.is_empty() {
        "every process and slab cache".to_string()
    } else {
        format!("{} process(es)", watcher.watched_processes())
    };
    engine::say(format_args!(
        "memtrace: watching {target} every {:?}, trend window {:?} (Ctrl-C for the summary)",
        args.interval, args.window
    ));
    let quiet = args.quiet;
    let mut tracing = args.trace.then(watch::trace::Tracing::default);
    // Findings waiting for a trace (at most MAX_RUNNING run at once).
    let mut pending: Vec<(watch::FindingKind, Option<u32>, Option<String>)> = Vec::new();
    let ended_by = watcher.run(|w, outcome| {
        if !quiet {
            engine::say(format_args!("{}", watch::live_line(w)));
        }
        if let Some(tracing) = tracing.as_mut() {
            let results = tracing.results();
            w.apply_traces(results);
            pending.extend(outcome.new.iter().cloned());
            let mut started = false;
            while tracing.running() < watch::trace::MAX_RUNNING && !pending.is_empty() {
                let (kind, pid, cache) = pending.remove(0);
                let what = cache
                    .clone()
                    .or(pid.map(|p| format!("pid {p}")))
                    .unwrap_or_default();
                // Within -d: a trace ends with the watch.
                let left = args
                    .duration
                    .map_or(args.trace_for, |d| d.saturating_sub(w.elapsed()));
                let trace_for = args.trace_for.min(left);
                if trace_for < Duration::from_secs(1) {
                    engine::say(format_args!(
                        "memtrace: {what} grows, but -d leaves no time to trace it"
                    ));
                    continue;
                }
                engine::say(format_args!(
                    "memtrace: tracing {what} for {trace_for:.1?} to find what grows it"
                ));
                let at_s = w.elapsed().as_secs_f64();
                tracing.start(kind, pid, cache, trace_for, at_s);
                started = true;
            }
            // The trace's own programs and maps are kernel memory, not a leak.
            if started {
                w.restart_slab_trends();
            }
        }
        ControlFlow::Continue(())
    });
    if let Some(tracing) = tracing.as_mut() {
        if tracing.active() {
            engine::say(format_args!(
                "memtrace: waiting for the traces to end (at most {:?}; Ctrl-C ends them now)",
                args.trace_for
            ));
        }
        watcher.apply_traces(tracing.finish());
    }
    let report = watcher.report(ended_by);
    // The summary first: a plot that cannot be written must not cost it.
    let delivered = sink.write(&report, engine::ReportKind::Final)?;
    if let Some((path, mut file)) = plot {
        use std::io::Write as _;
        let title = format!(
            "memtrace watch: {} samples over {:.0}s",
            report.samples, report.duration_s
        );
        file.write_all(watch::plot::svg(&title, &watcher.plot_series()).as_bytes())
            .with_context(|| format!("writing the plot to {}", path.display()))?;
    }
    if delivered == Delivery::ReaderGone {
        return Ok(ExitCode::from(EXIT_READER_GONE));
    }
    Ok(ExitCode::SUCCESS)
}

fn check(format: Format) -> anyhow::Result<ExitCode> {
    let (probes, ok) = memtrace::check::run();
    let text = match format {
        Format::Json => {
            serde_json::to_string_pretty(&probes).context("serializing the probes")? + "\n"
        }
        _ => memtrace::check::render(&probes),
    };
    if output::write_stdout(&text)? == Delivery::ReaderGone {
        return Ok(ExitCode::from(EXIT_READER_GONE));
    }
    if !ok {
        anyhow::bail!("this kernel lacks something memtrace needs (see FAIL above)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit code for an error: the library's errors a user can act on have their own.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<memtrace::Error>() {
        Some(memtrace::Error::NotRoot) => EXIT_NOT_ROOT,
        Some(memtrace::Error::NoSuchProcess(_) | memtrace::Error::KernelThread { .. }) => {
            EXIT_NO_SUCH_PROCESS
        }
        Some(memtrace::Error::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            EXIT_COMMAND_NOT_FOUND
        }
        Some(memtrace::Error::Spawn { .. }) => EXIT_CANNOT_EXECUTE,
        _ => EXIT_ERROR,
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Faults(args) => faults(args),
        Cmd::Slab(args) => slab(args),
        Cmd::Vma(args) => vma(args),
        Cmd::Snapshot(args) => snapshot(args),
        Cmd::Watch(args) => watch(args),
        Cmd::Check { format } => check(format),
    };
    result.unwrap_or_else(|e| {
        let _ = writeln!(std::io::stderr(), "memtrace: error: {e:#}");
        ExitCode::from(exit_code(&e))
    })
}
