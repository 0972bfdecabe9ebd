//! One tracing run: start or attach to the targets, collect until the end condition, report.
use std::{
    io::{Read as _, Write as _},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    collector::Collector,
    loader::{Tracer, TracerOptions},
    report::{self, FaultReport, ReportInput, ReportOptions},
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

/// Is the process alive (and not a zombie)?
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

/// Finds a command the way execvp would, so "not found" is reported before anything starts.
pub fn resolve_command(name: &str) -> Result<PathBuf, Error> {
    let not_found = || Error::Spawn {
        command: name.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "command not found"),
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() { Ok(p) } else { Err(not_found()) };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(not_found)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A started command, held before exec until it is in the target map.
struct Traced {
    child: Child,
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
    Ok(Traced { child })
}

/// Runs `memtrace faults`: calls `on_report` for every interval report, returns the final one.
pub async fn run_faults(
    opts: &FaultsOptions,
    mut on_report: impl FnMut(&FaultReport),
) -> Result<FaultReport, Error> {
    if let Target::Pids(pids) = &opts.target {
        if let Some(&missing) = pids.iter().find(|&&p| !process_alive(p)) {
            return Err(Error::NoSuchProcess(missing));
        }
    }
    let tracer_opts = TracerOptions {
        filter_pids: !matches!(opts.target, Target::System),
        ..opts.tracer
    };
    let mut tracer = Tracer::load(tracer_opts)?;
    let mut collector = Collector::default();
    let mut traced = None;
    let mut watched: Vec<u32> = Vec::new();
    match &opts.target {
        Target::System => {}
        Target::Pids(pids) => {
            for &pid in pids {
                tracer.add_target(pid)?;
                collector.observe(pid);
                watched.push(pid);
            }
        }
        Target::Command(argv) => {
            // The child is still memtrace's fork, held before exec: reading its maps now lets
            // the faults it takes until exec be classified like the rest.
            let t = spawn_held(argv, |pid| {
                tracer.add_target(pid)?;
                collector.observe(pid);
                Ok(())
            })?;
            watched.push(t.child.id());
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
    eprintln!(
        "memtrace: tracing page faults of {}; Ctrl-C to stop",
        describe(&opts.target, &watched)
    );
    let mut symbolizer = Symbolizer::new();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut interval = opts
        .interval
        .map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
    let mut exit_check = tokio::time::interval(Duration::from_millis(100));
    // The kernel side wakes us only per batch; drain whatever is waiting at least this often.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(10));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|e| Error::Map(format!("polling the ring buffer: {e}")))?;
                drain(guard.get_inner_mut(), &mut collector);
                guard.clear_ready();
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = &mut ctrl_c => break,
            _ = async { match interval.as_mut() { Some(i) => { i.tick().await; } None => std::future::pending().await } } => {
                on_report(&snapshot(&tracer, &collector, &mut symbolizer, opts, start));
            }
            _ = drain_tick.tick() => drain(ring.get_mut(), &mut collector),
            _ = exit_check.tick() => {
                if targets_done(&mut traced, &watched, &collector) {
                    break;
                }
            }
        }
    }
    // Records still in flight when the end came.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drain(ring.get_mut(), &mut collector);
    if let Some(mut t) = traced {
        if t.child.try_wait().ok().flatten().is_none() {
            // Ended by Ctrl-C or --duration: the command keeps running unless the user stops it.
            log::info!("command {} still running", t.child.id());
        }
    }
    Ok(snapshot(&tracer, &collector, &mut symbolizer, opts, start))
}

/// Records handled per drain before the run loop gets a turn (signals, deadline, reports).
const DRAIN_BATCH: usize = 1 << 16;

/// Hands waiting ring-buffer records to the collector, at most a batch at a time.
fn drain(ring: &mut RingBuf<MapData>, collector: &mut Collector) {
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            break;
        };
        collector.on_bytes(&item);
    }
    collector.sweep();
}

/// A report of everything collected so far.
fn snapshot(
    tracer: &Tracer,
    collector: &Collector,
    symbolizer: &mut Symbolizer,
    opts: &FaultsOptions,
    start: Instant,
) -> FaultReport {
    let input = ReportInput {
        collector,
        counters: tracer.counters(),
        elapsed: start.elapsed(),
    };
    report::build(&input, symbolizer, &opts.report)
}

/// With targets: have they all exited (the command, its descendants, every -p pid)?
fn targets_done(traced: &mut Option<Traced>, watched: &[u32], collector: &Collector) -> bool {
    if watched.is_empty() {
        return false;
    }
    if let Some(t) = traced {
        if t.child.try_wait().ok().flatten().is_none() {
            return false;
        }
        return !collector.spawned.iter().any(|&p| process_alive(p));
    }
    !watched.iter().any(|&p| process_alive(p))
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
