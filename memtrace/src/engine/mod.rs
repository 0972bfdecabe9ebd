//! The engine every analysis runs on: targets (`-p`, `-- CMD`, the whole system), the kernel
//! programs of the analysis's hook groups, the ring buffer, `-d`, `-i`, SIGINT/SIGTERM and a
//! deadline that always wins. An analysis only says which hooks it needs, what it does with
//! each record, and what its report is.
mod signals;
mod target;

use std::{
    io::Write as _,
    ops::ControlFlow,
    process::ExitStatus,
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, time::MissedTickBehavior};

pub use signals::{install_stop_signals, stop_signal};
pub use target::{is_kernel_thread, process_alive, resolve_command, Target};

use crate::{
    collector::KernelFaults,
    hooks::HookGroup,
    loader::{Tracer, TracerOptions},
    Error,
};
use target::{describe, spawn_held, watch_pids, Traced, WatchedProcess};

/// One analysis (`memtrace faults`, `memtrace slab`, ...) on the shared engine.
pub trait Analysis {
    type Report;

    /// What the start banner says is traced ("page faults").
    fn what(&self) -> &'static str;

    /// The hook groups to load and attach: only these.
    fn hook_groups(&self) -> &'static [&'static HookGroup];

    /// May `-p` name a kernel thread? (Page faults: no, they take none; slab: yes.)
    fn traces_kernel_threads(&self) -> bool {
        false
    }

    /// The programs are loaded and attached, no target has started: take the maps read at
    /// report time, open side channels, say what the run goes without.
    fn start(&mut self, tracer: &mut Tracer, system_wide: bool) -> Result<(), Error>;

    /// A process the run traces from now on (`-p`, or the command, still held before exec).
    fn target_added(&mut self, pid: u32);

    /// Handles waiting ring-buffer records, at most [`DRAIN_BATCH`] or [`DRAIN_BUDGET`] at a
    /// time. Returns whether it stopped with records possibly still waiting.
    fn drain(&mut self, ring: &mut crate::ring::Ring) -> bool;

    /// Is a process the command started (other than the command itself) still alive?
    fn descendants_alive(&self, command: u32) -> bool;

    /// Builds a report. An interval report covers the time since the previous report; the
    /// final one covers the whole run.
    fn report(&mut self, ctx: &ReportContext<'_>) -> Self::Report;
}

/// What the engine knows when a report is due.
pub struct ReportContext<'a> {
    pub kind: ReportKind,
    /// Since tracing started.
    pub elapsed: Duration,
    /// What this report covers: since the previous report for an interval report, the whole
    /// run for the final one.
    pub covers: Duration,
    pub tracer: &'a Tracer,
    /// The kernel's counts for the traced command and the descendants it waited for, once it
    /// has been reaped (wait4's rusage).
    pub command_faults: Option<KernelFaults>,
}

impl<'a> ReportContext<'a> {
    /// A report due now, covering the time since `since`.
    fn new(
        kind: ReportKind,
        start: Instant,
        since: Instant,
        tracer: &'a Tracer,
        traced: &Option<Traced>,
    ) -> Self {
        Self {
            kind,
            elapsed: start.elapsed(),
            covers: since.elapsed(),
            tracer,
            command_faults: traced.as_ref().and_then(|t| t.ended).map(|e| e.1),
        }
    }
}

/// What every analysis takes from the command line.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub target: Target,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub tracer: TracerOptions,
}

/// What ended a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Every traced process exited (the command and its descendants, or every `-p` process).
    TargetsExited,
    /// `--duration` elapsed.
    Deadline,
    /// SIGINT or SIGTERM arrived (the signal's number).
    Signal(i32),
    /// The report callback asked to stop (its output went away).
    Stopped,
}

/// An interval report (`-i`) or the one at the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    Interval,
    Final,
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub ended_by: RunEnd,
    /// How the traced command ended, if it has.
    pub command_status: Option<ExitStatus>,
}

impl RunOutcome {
    /// The traced command's status as a shell gives it: its exit code, or 128 + the signal
    /// that killed it. `None` without a command, or while it still runs.
    pub fn command_exit_code(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        self.command_status
            .and_then(|status| status.code().or_else(|| status.signal().map(|s| 128 + s)))
    }
}

/// Records an analysis handles per drain before the run loop gets a turn (signals, deadline,
/// reports).
pub const DRAIN_BATCH: usize = 1 << 16;
/// The longest a drain runs before the loop gets its turn, for an agent slower than the
/// records come (a flooded system, a debug build): the deadline, signals and the latency
/// sample's 10 ms windows must not wait.
pub const DRAIN_BUDGET: Duration = Duration::from_millis(10);

/// How long a command sent SIGTERM at the end of a run gets to exit.
const COMMAND_EXIT_WAIT: Duration = Duration::from_secs(1);

/// The longest the last drain of a run goes on, while records keep coming.
const FINAL_DRAIN_BUDGET: Duration = Duration::from_millis(500);

/// Writes a line to stderr; a closed stderr is no reason to fail a run.
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs `analysis` until the targets exit, `--duration` passes, SIGINT/SIGTERM comes or
/// `on_report` breaks. Hands `on_report` every interval report and then the final one (unless
/// it broke), before the kernel programs are detached, which takes a while. Installs the
/// SIGINT/SIGTERM handler of [`install_stop_signals`] for the rest of the process's life.
pub async fn run<A: Analysis>(
    analysis: &mut A,
    opts: &RunOptions,
    mut on_report: impl FnMut(&A::Report, ReportKind) -> ControlFlow<()>,
) -> Result<RunOutcome, Error> {
    install_stop_signals();
    tune_allocator();
    // Refuse what cannot be traced before loading anything.
    let watched = match &opts.target {
        Target::Pids(pids) => watch_pids(pids, analysis.traces_kernel_threads())?,
        Target::Command(argv) => {
            if let Some(program) = argv.first() {
                resolve_command(program)?;
            }
            Vec::new()
        }
        Target::System => Vec::new(),
    };
    let system_wide = matches!(opts.target, Target::System);
    let tracer_opts = TracerOptions {
        filter_pids: !system_wide,
        ..opts.tracer
    };
    let mut tracer = Tracer::load(tracer_opts, analysis.hook_groups())?;
    for degraded in &tracer.degraded {
        say(format_args!("memtrace: {degraded}"));
    }
    analysis.start(&mut tracer, system_wide)?;
    let mut traced = None;
    match &opts.target {
        Target::System => {}
        Target::Pids(_) => {
            for w in &watched {
                tracer.add_target(w.pid)?;
                analysis.target_added(w.pid);
            }
        }
        Target::Command(argv) => {
            // The child is still memtrace's fork, held before exec: whatever the analysis
            // reads of it now covers it from its first instruction.
            let t = spawn_held(argv, |pid| {
                tracer.add_target(pid)?;
                analysis.target_added(pid);
                Ok(())
            })?;
            traced = Some(t);
        }
    }

    let ring = tracer
        .events
        .take()
        .ok_or_else(|| Error::Map("ring buffer already taken".into()))?;
    // SAFETY: the ring buffer map owns its fd, keeps it open and returns the same one for as long
    // as it lives, and the AsyncFd owns the map.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| Error::Map(format!("polling the ring buffer: {e}")))?;
    let start = Instant::now();
    // Per-record CPU is what tracing costs, not loading and verifying the programs.
    crate::report::AgentStats::tracing_started();
    let pids: Vec<u32> = watched
        .iter()
        .map(|w| w.pid)
        .chain(traced.as_ref().map(|t| t.child.id()))
        .collect();
    say(format_args!(
        "memtrace: tracing {} of {}; Ctrl-C to stop",
        analysis.what(),
        describe(&opts.target, &pids)
    ));
    let now = tokio::time::Instant::now();
    let deadline = opts.duration.and_then(|d| now.checked_add(d));
    // Would something that takes `cost`, started now, end past the deadline?
    let ends_past_deadline =
        |cost: Duration| deadline.is_some_and(|d| tokio::time::Instant::now() + cost >= d);
    let past_deadline = || ends_past_deadline(Duration::ZERO);
    // What the last interval report took to build and write.
    let mut report_cost = Duration::ZERO;
    let mut last_report = start;
    let mut interval = opts.interval.filter(|p| !p.is_zero()).and_then(|period| {
        let mut interval = tokio::time::interval_at(now.checked_add(period)?, period);
        // A report that takes longer than the period must not queue more reports behind it.
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Some(interval)
    });
    let mut exit_check = tokio::time::interval(Duration::from_millis(100));
    // The kernel side wakes us only per batch; drain whatever is waiting at least this often.
    // This tick also bounds how long a stop signal waits to be seen.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
    let mut latency_tick = tokio::time::interval(crate::loader::LATENCY_TICK);
    latency_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let ended_by = loop {
        if let Some(signal) = stop_signal() {
            break RunEnd::Signal(signal);
        }
        if past_deadline() {
            break RunEnd::Deadline;
        }
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|e| Error::Map(format!("polling the ring buffer: {e}")))?;
                // Records left by a drain cut short keep the ring ready for the next turn.
                if !analysis.drain(guard.get_inner_mut()) {
                    guard.clear_ready();
                }
                // A busy ring keeps this branch ready: the latency windows go on between drains.
                tracer.latency_tick();
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break RunEnd::Deadline,
            _ = async { match interval.as_mut() { Some(i) => { i.tick().await; } None => std::future::pending().await } } => {
                // Building a report takes a while: an end that is due comes first, and a report
                // that would end past the deadline is skipped (the final one follows at once).
                if stop_signal().is_some() || ends_past_deadline(report_cost) {
                    continue;
                }
                let building = Instant::now();
                let ctx = ReportContext::new(ReportKind::Interval, start, last_report, &tracer, &traced);
                last_report = building;
                let report = analysis.report(&ctx);
                let flow = on_report(&report, ReportKind::Interval);
                drop(report);
                release_freed_memory();
                report_cost = building.elapsed();
                if flow.is_break() {
                    break RunEnd::Stopped;
                }
            }
            _ = drain_tick.tick() => {
                analysis.drain(ring.get_mut());
            }
            _ = latency_tick.tick() => {
                tracer.latency_tick();
            }
            _ = exit_check.tick() => {
                if targets_done(&mut traced, &watched, analysis) {
                    break RunEnd::TargetsExited;
                }
            }
        }
    };
    if ended_by == RunEnd::Stopped {
        return Ok(RunOutcome {
            ended_by,
            command_status: traced.as_mut().and_then(Traced::poll),
        });
    }
    if let Some(t) = traced.as_mut() {
        // Ended by a signal or --duration with the command still running: end it as `perf
        // record` and `timeout` do, so no orphan outlives the run (a Ctrl-C on a terminal has
        // reached it already), and give it a moment so its exit is traced and its status known.
        if t.poll().is_none() {
            // SAFETY: kill takes a pid and a signal by value; the pid is our unreaped child,
            // so it cannot have been reused.
            unsafe { libc::kill(t.child.id() as libc::pid_t, libc::SIGTERM) };
            let asked = Instant::now();
            while t.poll().is_none() && asked.elapsed() < COMMAND_EXIT_WAIT {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Records still in flight when the end came.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // All of them, unless they come faster than they are read (the programs are still
    // attached): the end must not wait on a flooded system.
    let final_drain = Instant::now();
    while analysis.drain(ring.get_mut()) && final_drain.elapsed() < FINAL_DRAIN_BUDGET {}
    let command_status = traced.as_mut().and_then(Traced::poll);
    if let (Some(t), None) = (&traced, command_status) {
        // It ignored SIGTERM: leave it be rather than kill it outright.
        say(format_args!(
            "memtrace: command {} still running after SIGTERM; left running",
            t.child.id()
        ));
    }
    let ctx = ReportContext::new(ReportKind::Final, start, start, &tracer, &traced);
    let report = analysis.report(&ctx);
    // The caller knows what became of its output; the run ends here either way.
    let _ = on_report(&report, ReportKind::Final);
    Ok(RunOutcome {
        ended_by,
        command_status,
    })
}

/// Large blocks (hash tables, stack and symbol tables) get their own mappings, returned to the
/// system as soon as they are freed: with glibc's default the threshold rises after each
/// large free, so a table outgrown by a rehash stays in the heap, resident, for the rest of a
/// long run. Two arenas: the agent allocates on one thread, a few helpers seldom.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets glibc's allocator parameters; it has no preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed after a report back to the system: a report's transient peak (frames,
/// serialization) should not stay resident for the rest of a long run.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own heap; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// With targets: have they all exited (the command, its descendants, every -p process)?
fn targets_done(
    traced: &mut Option<Traced>,
    watched: &[WatchedProcess],
    analysis: &impl Analysis,
) -> bool {
    if let Some(t) = traced {
        // The command itself: its Child knows, whatever has become of its pid since.
        if t.poll().is_none() {
            return false;
        }
        return !analysis.descendants_alive(t.child.id());
    }
    !watched.is_empty() && watched.iter().all(WatchedProcess::exited)
}
