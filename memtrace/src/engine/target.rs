//! What a run traces: the whole system, `-p` processes held by pidfds, or a command started
//! held before exec until it is in the kernel's target map.
use std::{
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
};

use crate::{collector::KernelFaults, engine::say, Error};

#[derive(Clone, Debug)]
pub enum Target {
    System,
    Pids(Vec<u32>),
    Command(Vec<String>),
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
pub fn is_kernel_thread(pid: u32) -> Option<bool> {
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
pub(crate) struct WatchedProcess {
    pub(crate) pid: u32,
    pidfd: Option<OwnedFd>,
}

impl WatchedProcess {
    pub(crate) fn exited(&self) -> bool {
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
/// is refused unless the analysis traces them (it takes no user page faults, but allocates
/// kernel memory), and each process is held by a pidfd from now on.
pub(crate) fn watch_pids(pids: &[u32], kernel_threads: bool) -> Result<Vec<WatchedProcess>, Error> {
    let mut watched: Vec<WatchedProcess> = Vec::new();
    for &pid in pids {
        let process = thread_group(pid)?;
        if process != pid {
            say(format_args!(
                "memtrace: pid {pid} is a thread of process {process}; tracing process {process}"
            ));
        }
        if !kernel_threads && is_kernel_thread(process) == Some(true) {
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
pub(crate) struct Traced {
    pub(crate) child: Child,
    /// How it ended, and the kernel's fault counts for it and every descendant it waited
    /// for (wait4's rusage), once reaped.
    pub(crate) ended: Option<(ExitStatus, KernelFaults)>,
}

impl Traced {
    /// Reaps the command if it has exited; never blocks.
    pub(crate) fn poll(&mut self) -> Option<ExitStatus> {
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
pub(crate) fn spawn_held(
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

pub(crate) fn describe(target: &Target, watched: &[u32]) -> String {
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
