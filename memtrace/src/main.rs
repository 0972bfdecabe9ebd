//! The `memtrace` command line: a thin layer over the library.
use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use memtrace::{
    loader::TracerOptions,
    report::{self, Format, ReportOptions},
    session::{self, FaultsOptions, Target},
};

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
    /// What this kernel allows and which probes memtrace will use.
    Check {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration '{s}' (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in '{s}' (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Args)]
struct FaultsArgs {
    /// Trace this process (all its threads); repeat for several.
    #[arg(short, long = "pid")]
    pid: Vec<u32>,
    /// Stop after this long (e.g. 10s, 500ms, 2m).
    #[arg(short, long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print a report every interval meanwhile.
    #[arg(short, long, value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Rows of processes and callsites in the table.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Per-thread counts in the table.
    #[arg(long)]
    threads: bool,
    /// Draw log2 latency histograms.
    #[arg(long)]
    hist: bool,
    /// Skip stack capture (cheapest mode).
    #[arg(long)]
    no_stacks: bool,
    /// Walk the user stack on every fault instead of reusing repeats (for comparison).
    #[arg(long, hide = true)]
    no_stack_cache: bool,
    /// Attach classic tracepoints where raw tracepoints would work (for comparison).
    #[arg(long, hide = true)]
    classic_tracepoints: bool,
    /// Ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 16)]
    ringbuf_mb: u32,
    /// Command to start and trace, with its children.
    #[arg(last = true)]
    command: Vec<String>,
}

fn faults(args: FaultsArgs) -> anyhow::Result<()> {
    let target = match (args.pid.is_empty(), args.command.is_empty()) {
        (true, true) => Target::System,
        (false, true) => Target::Pids(args.pid.clone()),
        (true, false) => Target::Command(args.command.clone()),
        (false, false) => anyhow::bail!("give either -p PID or -- COMMAND, not both"),
    };
    if !args.ringbuf_mb.is_power_of_two() {
        anyhow::bail!("--ringbuf-mb must be a power of two");
    }
    let opts = FaultsOptions {
        target,
        duration: args.duration,
        interval: args.interval,
        tracer: TracerOptions {
            filter_pids: false,
            capture_stacks: !args.no_stacks,
            stack_cache: !args.no_stack_cache,
            ringbuf_bytes: args.ringbuf_mb.saturating_mul(1024 * 1024),
            classic_tracepoints: args.classic_tracepoints,
        },
        report: ReportOptions {
            format: args.format,
            top: args.top,
            threads: args.threads,
            hist: args.hist,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report_opts = opts.report;
    let final_report = runtime.block_on(session::run_faults(&opts, |r| {
        print!("{}", report::render(r, &report_opts));
    }))?;
    print!("{}", report::render(&final_report, &report_opts));
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Faults(args) => faults(args),
        Cmd::Check { format } => {
            let (probes, ok) = memtrace::check::run();
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&probes).unwrap_or_default()
                ),
                _ => print!("{}", memtrace::check::render(&probes)),
            }
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "this kernel lacks something memtrace needs (see FAIL above)"
                ))
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memtrace: error: {e:#}");
            let code = match e.downcast_ref::<memtrace::Error>() {
                Some(memtrace::Error::NotRoot) => 77,
                Some(memtrace::Error::NoSuchProcess(_)) => 3,
                Some(memtrace::Error::Spawn { .. }) => 127,
                _ => 1,
            };
            ExitCode::from(code)
        }
    }
}
