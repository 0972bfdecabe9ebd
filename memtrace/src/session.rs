//! One tracing run: start or attach to the targets, collect until the end condition, report.
use std::{
    io::{Read as _, Write as _},
    ops::ControlFlow,
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::atomic::{AtomicI32, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, time::MissedTickBehavior};

use crate::{
    collector::{Collector, KernelFaults},
    loader::{Tracer, TracerOptions},
    report::{self, FaultReport, ReportInput, ReportOptions},
    sideband::{self, Sideband},
    symbolize::Symbolizer,
    Error,
};

#[derive(Clone, Debug)]
pub enum Target {
    System,
    Pids(Vec<u32>),
    Command(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct FaultsOptions {
    pub target: Target,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub tracer: TracerOptions,
    pub report: ReportOptions,
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
        self.command_status
            .and_then(|status| status.code().or_else(|| status.signal().map(|s| 128 + s)))
    }
}

/// Is the process alive (and not a zombie)? By number, so a reused pid looks alive: prefer a
/// pidfd or the `Child` where there is one.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised comm, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// `PF_KTHREAD` in the flags of /proc/PID/stat (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Is `pid` a kernel thread? `None` if /proc cannot tell.
fn is_kernel_thread(pid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // After the comm: state (field 3), ppid, pgrp, session, tty_nr, tpgid, flags (field 9).
    let flags: u64 = rest.split_whitespace().nth(6)?.parse().ok()?;
    Some(flags & PF_KTHREAD != 0)
}

/// The process (thread group) that thread `tid` belongs to: `tid` itself for a main thread.
fn thread_group(tid: u32) -> Result<u32, Error> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .ok_or(Error::NoSuchProcess(tid))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// A `-p` process, held by a pidfd where the kernel has them (5.3+): the pidfd names that very
/// process, so its exit is seen even if its pid is reused meanwhile.
struct WatchedProcess {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl WatchedProcess {
    fn exited(&self) -> bool {
        match &self.pidfd {
            Some(fd) => pidfd_exited(fd),
            None => !process_alive(self.pid),
        }
    }
}

/// Opens a pidfd on process `pid`; `None` where the kernel cannot give one.
fn pidfd_open(pid: u32) -> Result<Option<OwnedFd>, Error> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| Error::NoSuchProcess(pid))?;
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if let Ok(fd) = i32::try_from(fd) {
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd to us and nothing else owns it.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Err(Error::NoSuchProcess(pid as u32));
    }
    log::warn!("no pidfd for pid {pid} ({err}): watching its exit through /proc");
    Ok(None)
}

/// Has the process behind `pidfd` exited? A pidfd turns readable when it has; never blocks.
fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the length 1, and a zero timeout: poll returns at once.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & libc::POLLIN != 0
}

/// Resolves the `-p` pids: a thread stands for its process (said on stderr), a kernel thread
/// is refused (it takes no user page faults), and each process is held by a pidfd from now on.
fn watch_pids(pids: &[u32]) -> Result<Vec<WatchedProcess>, Error> {
    let mut watched: Vec<WatchedProcess> = Vec::new();
    for &pid in pids {
        let process = thread_group(pid)?;
        if process != pid {
            say(format_args!(
                "memtrace: pid {pid} is a thread of process {process}; tracing process {process}"
            ));
        }
        if is_kernel_thread(process) == Some(true) {
            return Err(Error::KernelThread {
                pid,
                comm: comm(process),
            });
        }
        if watched.iter().any(|w| w.pid == process) {
            continue;
        }
        let w = WatchedProcess {
            pid: process,
            pidfd: pidfd_open(process)?,
        };
        // A zombie has exited already: nothing left to trace.
        if w.exited() {
            return Err(Error::NoSuchProcess(pid));
        }
        watched.push(w);
    }
    Ok(watched)
}

/// The first SIGINT or SIGTERM of the run (0 until one comes), and how many have come.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOP_SIGNALS_SEEN: AtomicU32 = AtomicU32::new(0);

/// SIGINT/SIGTERM handler. The first signal asks the run to end with its final report; a later
/// one means the user will not wait for that report, and ends the process at once with the
/// shell's code for the signal (130 for SIGINT, 143 for SIGTERM).
extern "C" fn on_stop_signal(signal: libc::c_int) {
    if STOP_SIGNALS_SEEN.fetch_add(1, Ordering::SeqCst) == 0 {
        STOP_SIGNAL.store(signal, Ordering::SeqCst);
    } else {
        // SAFETY: _exit is async-signal-safe; the kernel drops the eBPF programs with our fds.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// Makes SIGINT and SIGTERM end a run gracefully (see [`on_stop_signal`]). The handler stays
/// after the run, so a second signal while the caller writes the final report ends the process.
pub fn install_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: all-zero is a valid sigaction (no flags, empty mask); its fields are set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: both calls get valid pointers to our own sigaction; the handler only touches
        // atomics and calls _exit, which are async-signal-safe.
        let rc = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            log::warn!(
                "cannot handle signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The signal that asked the run to end, if one has.
fn stop_signal() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Writes a line to stderr; a closed stderr is no reason to fail a run.
fn say(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Finds a command the way execvp would, so "not found" (127 in a shell) and "cannot execute"
/// (126) are reported before anything starts.
pub fn resolve_command(name: &str) -> Result<PathBuf, Error> {
    let fail = |kind, why: &str| Error::Spawn {
        command: name.to_string(),
        source: std::io::Error::new(kind, why),
    };
    let not_found = || fail(std::io::ErrorKind::NotFound, "command not found");
    let not_executable = || {
        fail(
            std::io::ErrorKind::PermissionDenied,
            "not executable (no execute permission)",
        )
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                Err(fail(std::io::ErrorKind::PermissionDenied, "is a directory"))
            }
            Ok(_) if is_executable(&path) => Ok(path),
            Ok(_) => Err(not_executable()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found()),
            Err(e) => Err(Error::Spawn {
                command: name.to_string(),
                source: e,
            }),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let candidates: Vec<PathBuf> = std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
        .collect();
    match candidates.iter().find(|p| is_executable(p)) {
        Some(p) => Ok(p.clone()),
        // Like execvp: a file found without execute permission is "permission denied".
        None if !candidates.is_empty() => Err(not_executable()),
        None => Err(not_found()),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A started command, held before exec until it is in the target map.
struct Traced {
    child: Child,
    /// How it ended, and the kernel's fault counts for it and every descendant it waited
    /// for (wait4's rusage), once reaped.
    ended: Option<(ExitStatus, KernelFaults)>,
}

impl Traced {
    /// Reaps the command if it has exited; never blocks.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.ended.is_none() {
            let pid = self.child.id() as libc::pid_t;
            let mut status = 0;
            // SAFETY: all-zero is a valid rusage; wait4 fills it in.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointers to our own status and rusage; WNOHANG never blocks.
            let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid {
                let faults = KernelFaults {
                    minor: usage.ru_minflt as u64,
                    major: usage.ru_majflt as u64,
                };
                self.ended = Some((ExitStatus::from_raw(status), faults));
            }
        }
        self.ended.map(|(status, _)| status)
    }
}

/// Starts `argv` so that it cannot run a single instruction of the command before `register`
/// has put its pid in the kernel's target map: the child blocks in `pre_exec` on a pipe.
fn spawn_held(
    argv: &[String],
    register: impl FnOnce(u32) -> Result<(), Error>,
) -> Result<Traced, Error> {
    let program = resolve_command(&argv[0])?;
    let spawn_err = |source| Error::Spawn {
        command: argv.join(" "),
        source,
    };
    let (mut pid_rx, pid_tx) = std::io::pipe().map_err(spawn_err)?;
    let (go_rx, mut go_tx) = std::io::pipe().map_err(spawn_err)?;
    let pid_tx_fd = pid_tx.as_raw_fd();
    let go_rx_fd = go_rx.as_raw_fd();
    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..]).arg0(&argv[0]);
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe getpid, write and read on pipe fds that stay open across the fork.
    unsafe {
        cmd.pre_exec(move || {
            let pid = libc::getpid().to_ne_bytes();
            libc::write(pid_tx_fd, pid.as_ptr().cast(), pid.len());
            let mut go = [0u8; 1];
            if libc::read(go_rx_fd, go.as_mut_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::other(
                    "memtrace went away before the command started",
                ));
            }
            Ok(())
        });
    }
    // `spawn` waits for exec, which waits for the go byte: run it on its own thread.
    // The thread owns the child's ends of the pipes until spawn returns, so they stay open
    // through the fork, and closing them afterwards turns a failed exec into EOF here.
    let spawner = std::thread::spawn(move || {
        let spawned = cmd.spawn();
        drop((pid_tx, go_rx));
        spawned
    });
    let mut pid = [0u8; 4];
    let registered = match pid_rx.read_exact(&mut pid) {
        Ok(()) => register(i32::from_ne_bytes(pid) as u32),
        Err(e) => Err(spawn_err(e)),
    };
    // Release the child either way; if registration failed it is killed below.
    let _ = go_tx.write_all(&[1]);
    drop(go_tx);
    let child = spawner
        .join()
        .map_err(|_| spawn_err(std::io::Error::other("spawn thread panicked")))?
        .map_err(spawn_err)?;
    if let Err(e) = registered {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(Traced { child, ended: None })
}

/// Runs `memtrace faults` until the targets exit, `--duration` passes, SIGINT/SIGTERM comes or
/// `on_report` breaks. Hands `on_report` every interval report and then the final one (unless
/// it broke), before the kernel programs are detached, which takes a while. Installs the
/// SIGINT/SIGTERM handler of [`install_stop_signals`] for the rest of the process's life.
pub async fn run_faults(
    opts: &FaultsOptions,
    mut on_report: impl FnMut(&FaultReport, ReportKind) -> ControlFlow<()>,
) -> Result<RunOutcome, Error> {
    install_stop_signals();
    // Refuse what cannot be traced before loading anything.
    let watched = match &opts.target {
        Target::Pids(pids) => watch_pids(pids)?,
        Target::Command(argv) => {
            if let Some(program) = argv.first() {
                resolve_command(program)?;
            }
            Vec::new()
        }
        Target::System => Vec::new(),
    };
    let tracer_opts = TracerOptions {
        filter_pids: !matches!(opts.target, Target::System),
        ..opts.tracer
    };
    let mut tracer = Tracer::load(tracer_opts)?;
    let mut collector = Collector::default();
    collector.follow_all = matches!(opts.target, Target::System);
    // Opened before the command starts, so its exec and first mappings are recorded.
    let mut sideband = match Sideband::open() {
        Ok(sideband) => {
            collector.sideband = true;
            Some(sideband)
        }
        Err(e) => {
            say(format_args!(
                "memtrace: no perf side-band ({e}): mappings of processes that exit quickly \
                 may go unclassified"
            ));
            None
        }
    };
    let mut traced = None;
    match &opts.target {
        Target::System => {}
        Target::Pids(_) => {
            for w in &watched {
                tracer.add_target(w.pid)?;
                collector.observe_from_now(w.pid);
            }
        }
        Target::Command(argv) => {
            // The child is still memtrace's fork, held before exec: reading its maps now lets
            // the faults it takes until exec be classified like the rest.
            let t = spawn_held(argv, |pid| {
                tracer.add_target(pid)?;
                collector.observe_from_now(pid);
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
        "memtrace: tracing page faults of {}; Ctrl-C to stop",
        describe(&opts.target, &pids)
    ));
    let mut symbolizer = Symbolizer::new();
    let now = tokio::time::Instant::now();
    let deadline = opts.duration.and_then(|d| now.checked_add(d));
    // Would something that takes `cost`, started now, end past the deadline?
    let ends_past_deadline =
        |cost: Duration| deadline.is_some_and(|d| tokio::time::Instant::now() + cost >= d);
    let past_deadline = || ends_past_deadline(Duration::ZERO);
    // What the last interval report took to build and write.
    let mut report_cost = Duration::ZERO;
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
                if !drain(guard.get_inner_mut(), sideband.as_mut(), &mut collector) {
                    guard.clear_ready();
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break RunEnd::Deadline,
            _ = async { match interval.as_mut() { Some(i) => { i.tick().await; } None => std::future::pending().await } } => {
                // Building a report takes a while: an end that is due comes first, and a report
                // that would end past the deadline is skipped (the final one follows at once).
                if stop_signal().is_some() || ends_past_deadline(report_cost) {
                    continue;
                }
                let building = Instant::now();
                let command_faults = traced.as_ref().and_then(|t| t.ended).map(|e| e.1);
                let report = snapshot(&tracer, &collector, &mut symbolizer, opts, start, command_faults);
                let flow = on_report(&report, ReportKind::Interval);
                drop(report);
                release_freed_memory();
                report_cost = building.elapsed();
                if flow.is_break() {
                    break RunEnd::Stopped;
                }
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), sideband.as_mut(), &mut collector);
            }
            _ = exit_check.tick() => {
                if targets_done(&mut traced, &watched, &collector) {
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
    while drain(ring.get_mut(), sideband.as_mut(), &mut collector)
        && final_drain.elapsed() < FINAL_DRAIN_BUDGET
    {}
    let command_status = traced.as_mut().and_then(Traced::poll);
    if let (Some(t), None) = (&traced, command_status) {
        // It ignored SIGTERM: leave it be rather than kill it outright.
        say(format_args!(
            "memtrace: command {} still running after SIGTERM; left running",
            t.child.id()
        ));
    }
    let command_faults = traced.as_ref().and_then(|t| t.ended).map(|e| e.1);
    let report = snapshot(
        &tracer,
        &collector,
        &mut symbolizer,
        opts,
        start,
        command_faults,
    );
    // The caller knows what became of its output; the run ends here either way.
    let _ = on_report(&report, ReportKind::Final);
    Ok(RunOutcome {
        ended_by,
        command_status,
    })
}

/// Records handled per drain before the run loop gets a turn (signals, deadline, reports).
const DRAIN_BATCH: usize = 1 << 16;
/// The longest a drain runs before the loop gets its turn, for a collector slower than the
/// records come (a flooded system, a debug build): the deadline and signals must not wait.
const DRAIN_BUDGET: Duration = Duration::from_millis(50);

/// How long a command sent SIGTERM at the end of a run gets to exit.
const COMMAND_EXIT_WAIT: Duration = Duration::from_secs(1);

/// The longest the last drain of a run goes on, while records keep coming.
const FINAL_DRAIN_BUDGET: Duration = Duration::from_millis(500);

/// Hands waiting ring-buffer records to the collector, at most a batch (or a time budget) at a
/// time, merged in time order with the side-band's records. Returns whether it stopped with
/// records possibly still waiting.
fn drain(
    ring: &mut RingBuf<MapData>,
    mut sideband: Option<&mut Sideband>,
    collector: &mut Collector,
) -> bool {
    let started = Instant::now();
    // Every side-band record older than `cutoff` has been read: a ring record up to that time
    // is handled after the mappings and execs that came before it.
    let mut catch_up = |collector: &mut Collector| {
        let now = sideband::monotonic_ns();
        if let Some(sideband) = sideband.as_deref_mut() {
            collector.queue_side(sideband.poll());
            collector.stats.sideband_lost = sideband.lost();
        }
        now
    };
    let mut cutoff = catch_up(collector);
    let mut more = true;
    for n in 0..DRAIN_BATCH {
        if n % 1024 == 1023 && started.elapsed() >= DRAIN_BUDGET {
            break;
        }
        let Some(item) = ring.next() else {
            more = false;
            break;
        };
        // A record newer than the side-band read so far: read the side-band again first.
        if crate::record::time_of(&item).is_some_and(|t| t > cutoff) {
            cutoff = catch_up(collector);
        }
        collector.on_bytes(&item);
    }
    if !more {
        collector.settle(cutoff);
    }
    collector.sweep();
    more
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

/// A report of everything collected so far.
fn snapshot(
    tracer: &Tracer,
    collector: &Collector,
    symbolizer: &mut Symbolizer,
    opts: &FaultsOptions,
    start: Instant,
    command_faults: Option<KernelFaults>,
) -> FaultReport {
    let input = ReportInput {
        collector,
        counters: tracer.counters(),
        elapsed: start.elapsed(),
        command_faults,
    };
    report::build(&input, symbolizer, &opts.report)
}

/// With targets: have they all exited (the command, its descendants, every -p process)?
fn targets_done(
    traced: &mut Option<Traced>,
    watched: &[WatchedProcess],
    collector: &Collector,
) -> bool {
    if let Some(t) = traced {
        // The command itself: its Child knows, whatever has become of its pid since.
        if t.poll().is_none() {
            return false;
        }
        let command = t.child.id();
        // Its descendants: an exit record settles it; /proc covers a record not read (or lost).
        return !collector
            .spawned
            .iter()
            .filter(|&&pid| pid != command)
            .any(|&pid| {
                !collector.processes.get(&pid).is_some_and(|p| p.exited) && process_alive(pid)
            });
    }
    !watched.is_empty() && watched.iter().all(WatchedProcess::exited)
}

fn describe(target: &Target, watched: &[u32]) -> String {
    match target {
        Target::System => "the whole system".into(),
        Target::Pids(_) => format!("pid {}", join(watched)),
        Target::Command(argv) => format!(
            "{} (pid {}) and its children",
            argv.join(" "),
            join(watched)
        ),
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
