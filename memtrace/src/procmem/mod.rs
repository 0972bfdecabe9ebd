//! Process and system memory as the kernel accounts it, read from /proc without eBPF:
//! `memtrace snapshot` prints it, `memtrace watch` samples it over time.
//!
//! Per process: VSS from `statm`, RSS/PSS/USS/swap from `smaps_rollup` (the kernel's exact
//! totals), and the same figures per kind of memory from `smaps`. For the system: /proc/meminfo
//! itemized, and the slab caches that hold most from /proc/slabinfo.
pub mod meminfo;
mod render;
pub mod smaps;

use std::{io, time::Instant};

use serde::Serialize;

pub use meminfo::Meminfo;
pub use render::render;
pub use smaps::{Figures, Kinds};

use crate::slab::caches::read_slabinfo;

/// One process's memory, in bytes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessMemory {
    pub pid: u32,
    pub comm: String,
    /// Virtual size: every mapping, touched or not.
    pub vss: u64,
    pub rss: u64,
    /// RSS with each shared page divided among the processes that map it.
    pub pss: u64,
    /// Pages only this process maps: what it would give back if it exited.
    pub uss: u64,
    pub swap: u64,
    pub swap_pss: u64,
    /// By kind of memory, from smaps (absent when only the totals were read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Kinds>,
}

/// Why a process's memory could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unreadable {
    /// No such process, or it exited while being read.
    Gone,
    /// Another user's process, and this one is not root.
    PermissionDenied,
    /// A kernel thread: it has no user memory.
    KernelThread,
    /// Some other I/O error.
    Error,
}

impl Unreadable {
    fn of(e: &io::Error) -> Self {
        match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::NotFound, _) | (_, Some(libc::ESRCH)) => Self::Gone,
            (io::ErrorKind::PermissionDenied, _) => Self::PermissionDenied,
            _ => Self::Error,
        }
    }

    pub fn describe(self) -> &'static str {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match self {
            Self::Gone => "no such process (or it exited while being read)",
            Self::PermissionDenied if root => {
                "permission denied, even to root (a process of another container, or a ptrace \
                 restriction: reading smaps needs ptrace access)"
            }
            Self::PermissionDenied => {
                "permission denied: another user's process (run as root to read it)"
            }
            Self::KernelThread => "a kernel thread: it has no user memory",
            Self::Error => "its /proc files could not be read",
        }
    }
}

/// A process the snapshot could not read, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    pub reason: Unreadable,
}

/// Reusable read buffers: a snapshot of every process reads two files per process, and
/// smaps of a large process runs to megabytes.
#[derive(Default)]
pub struct Reader {
    buf: String,
}

impl Reader {
    fn read(&mut self, path: &str) -> io::Result<&str> {
        use io::Read as _;
        self.buf.clear();
        std::fs::File::open(path)?.read_to_string(&mut self.buf)?;
        Ok(&self.buf)
    }

    /// Reads one process: the totals always, the kinds when `kinds`.
    pub fn process(&mut self, pid: u32, kinds: bool) -> Result<ProcessMemory, Unreadable> {
        let comm = self
            .read(&format!("/proc/{pid}/comm"))
            .map_err(|e| Unreadable::of(&e))?
            .trim_end()
            .to_string();
        // A kernel thread's smaps_rollup fails with ESRCH, as an exited process's does (or
        // is empty, on older kernels): /proc/PID/stat tells them apart.
        let gone_or_kernel = || match crate::engine::is_kernel_thread(pid) {
            Some(true) => Unreadable::KernelThread,
            _ => Unreadable::Gone,
        };
        let rollup = match self.read(&format!("/proc/{pid}/smaps_rollup")) {
            Ok(text) => smaps::parse_rollup(text),
            Err(e) => match Unreadable::of(&e) {
                Unreadable::Gone => return Err(gone_or_kernel()),
                other => return Err(other),
            },
        };
        let Some(rollup) = rollup else {
            return Err(gone_or_kernel());
        };
        let page = page_size();
        let vss = self
            .read(&format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |pages| pages * page);
        let kinds = if kinds {
            let text = self
                .read(&format!("/proc/{pid}/smaps"))
                .map_err(|e| Unreadable::of(&e))?;
            Some(smaps::parse_smaps(text))
        } else {
            None
        };
        Ok(ProcessMemory {
            pid,
            comm,
            vss,
            rss: rollup.rss,
            pss: rollup.pss,
            uss: rollup.uss,
            swap: rollup.swap,
            swap_pss: rollup.swap_pss,
            kinds,
        })
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The process a thread belongs to (itself for a main thread), from /proc/PID/status.
pub fn thread_group(tid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// Every process id in /proc.
pub fn all_pids() -> io::Result<Vec<u32>> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// A slab cache among those holding most memory.
#[derive(Clone, Debug, Serialize)]
pub struct SlabCacheUse {
    pub name: String,
    /// Active objects times object size.
    pub bytes: u64,
    pub active_objs: u64,
    pub objsize: u64,
}

/// The slab caches that hold most, largest first; the reason when /proc/slabinfo cannot be
/// read (it is root's only).
pub fn top_slab_caches(n: usize) -> Result<Vec<SlabCacheUse>, String> {
    let mut caches: Vec<SlabCacheUse> = read_slabinfo()?
        .into_iter()
        .map(|(name, row)| SlabCacheUse {
            name,
            bytes: row.active_objs * row.objsize,
            active_objs: row.active_objs,
            objsize: row.objsize,
        })
        .collect();
    caches.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    caches.truncate(n);
    Ok(caches)
}

/// The system's side of a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SystemView {
    #[serde(flatten)]
    pub meminfo: Meminfo,
    /// In use (MemTotal - MemFree) and in none of the itemized figures.
    pub not_itemized: u64,
    /// Sums over the processes read.
    pub processes_pss: u64,
    pub processes_uss: u64,
    pub processes_swap: u64,
    pub slab_caches: Vec<SlabCacheUse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slab_caches_error: Option<String>,
}

/// What `memtrace snapshot` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Sorted by USS, largest first.
    pub processes: Vec<ProcessMemory>,
    /// Processes asked for (or, system-wide, of other users) that could not be read.
    pub skipped: Vec<Skipped>,
    /// System-wide: kernel threads and processes that exited while being read, not listed.
    pub kernel_threads: u64,
    pub exited_while_read: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemView>,
    /// How long reading took.
    pub took_ms: f64,
    /// The table shows each process's kinds (asked for by pid, or `--kinds`).
    #[serde(skip)]
    pub show_kinds: bool,
}

/// Slab caches in the system view.
pub const TOP_SLAB_CACHES: usize = 8;

/// Reads the processes `pids` (each reported or skipped with its reason), or with `None`
/// every process and the system view.
pub fn snapshot(pids: Option<&[u32]>, kinds: bool) -> io::Result<Snapshot> {
    let started = Instant::now();
    let system_wide = pids.is_none();
    let pids = match pids {
        Some(p) => p.to_vec(),
        None => all_pids()?,
    };
    let mut reader = Reader::default();
    let mut snap = Snapshot {
        processes: Vec::with_capacity(pids.len()),
        skipped: Vec::new(),
        kernel_threads: 0,
        exited_while_read: 0,
        system: None,
        took_ms: 0.0,
        show_kinds: !system_wide,
    };
    for pid in pids {
        match reader.process(pid, kinds) {
            Ok(p) => snap.processes.push(p),
            Err(Unreadable::KernelThread) if system_wide => snap.kernel_threads += 1,
            Err(Unreadable::Gone) if system_wide => snap.exited_while_read += 1,
            Err(reason) => snap.skipped.push(Skipped {
                pid,
                comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .map(|c| c.trim_end().to_string()),
                reason,
            }),
        }
    }
    snap.processes
        .sort_by(|a, b| b.uss.cmp(&a.uss).then(a.pid.cmp(&b.pid)));
    if system_wide {
        let meminfo = Meminfo::read()?;
        let (slab_caches, slab_caches_error) = match top_slab_caches(TOP_SLAB_CACHES) {
            Ok(c) => (c, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        snap.system = Some(SystemView {
            not_itemized: meminfo.not_itemized(),
            meminfo,
            processes_pss: snap.processes.iter().map(|p| p.pss).sum(),
            processes_uss: snap.processes.iter().map(|p| p.uss).sum(),
            processes_swap: snap.processes.iter().map(|p| p.swap).sum(),
            slab_caches,
            slab_caches_error,
        });
    }
    snap.took_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_process_like_the_kernel_does() {
        // A sleeping child: its memory holds still while it is read (this test binary's own
        // does not: other tests run in its threads meanwhile).
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("start sleep");
        // Until it has exec'd and mapped its libc.
        let pid = child.id();
        let mut read = None;
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim_end() == "sleep" {
                read = Reader::default().process(pid, true).ok();
                if read.as_ref().is_some_and(|p| p.rss > 0) {
                    break;
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let p = read.expect("the sleeping child read");
        assert!(p.rss > 0 && p.pss > 0 && p.uss > 0 && p.vss >= p.rss);
        let kinds = p.kinds.unwrap();
        // The kinds cover every VMA: their RSS adds up to the rollup's.
        let total = kinds.total().rss;
        assert!(total.abs_diff(p.rss) <= p.rss / 50, "{total} vs {}", p.rss);
        assert!(kinds.file_private.rss > 0, "sleep's own text and libc");
        assert!(kinds.stack.rss > 0);
    }

    #[test]
    fn a_missing_process_is_gone() {
        // Above the largest pid_max the kernel allows (4194304).
        let err = Reader::default().process(4_194_305, true).unwrap_err();
        assert_eq!(err, Unreadable::Gone);
        // kthreadd, where /proc shows it.
        if crate::engine::is_kernel_thread(2) == Some(true) {
            let err = Reader::default().process(2, true).unwrap_err();
            assert_eq!(err, Unreadable::KernelThread);
        }
    }
}
