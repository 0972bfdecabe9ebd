//! The perf side-band: the kernel's own record of every mapping, exec and rename, from a dummy
//! software perf event on each CPU (what `perf record` uses to symbolize).
//!
//! A process that lives a millisecond is gone before `/proc/PID/maps` can be read; its
//! `PERF_RECORD_MMAP2` records (with `mmap_data`: data, heap, stack and anonymous mappings too,
//! exec's own mappings included) and its `PERF_RECORD_COMM` (with `comm_exec`) are written as
//! the kernel makes each change. They carry `CLOCK_MONOTONIC` timestamps, the clock of the ring
//! buffer's records, so the collector applies each one just before the first fault that is
//! newer (see [`crate::collector::Collector::queue_side`]).
use foldhash::HashSet;
use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crate::{
    addrspace::Vma,
    perf::{open_on_cpu, PerfEventAttr, PERF_TYPE_SOFTWARE},
};

/// A side-band event, ready for the collector.
#[derive(Clone, Debug, PartialEq)]
pub struct SideEvent {
    /// `CLOCK_MONOTONIC`, ns.
    pub time_ns: u64,
    /// The process (thread group).
    pub pid: u32,
    pub kind: SideKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SideKind {
    /// A mapping was created or changed (mmap, mprotect, brk, the mappings exec sets up).
    Map(Vma),
    /// The process exec'd: its address space starts empty; `comm` is its new name.
    Exec { comm: Arc<str> },
    /// The process renamed its main thread.
    Rename { comm: Arc<str> },
    /// The process exited (a ring record, applied in time order when fault records may still
    /// be on their way from the CPUs' batches).
    Exit { comm: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum SidebandError {
    #[error("listing online CPUs ({0})")]
    Cpus(String),
    #[error("perf_event_open on CPU {cpu}: {source}")]
    Open { cpu: u32, source: std::io::Error },
    #[error("mapping the perf buffer of CPU {cpu}: {source}")]
    Mmap { cpu: u32, source: std::io::Error },
}

// Kernel ABI (include/uapi/linux/perf_event.h).
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_TIME: u64 = 1 << 2;
// perf_event_attr flag bits.
const ATTR_MMAP: u64 = 1 << 8;
const ATTR_COMM: u64 = 1 << 9;
const ATTR_WATERMARK: u64 = 1 << 14;
const ATTR_MMAP_DATA: u64 = 1 << 17;
const ATTR_SAMPLE_ID_ALL: u64 = 1 << 18;
const ATTR_MMAP2: u64 = 1 << 23;
const ATTR_COMM_EXEC: u64 = 1 << 24;
const ATTR_USE_CLOCKID: u64 = 1 << 25;
// Record types and misc bits.
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_COMM: u32 = 3;
const PERF_RECORD_MMAP2: u32 = 10;
const PERF_RECORD_MISC_COMM_EXEC: u16 = 1 << 13;
// perf_event_mmap_page offsets of the data ring's bookkeeping.
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;
/// With `sample_id_all` and TID|TIME, every record ends with pid, tid (u32 each) and time.
const SAMPLE_ID_LEN: usize = 16;
/// mmap protection bits and the mapping flag perf reports.
const PROT_EXEC: u32 = 0x4;
const MAP_SHARED: u32 = 0x1;

/// One CPU's perf ring: a metadata page, then `data_size` bytes of records.
struct PerfRing {
    _fd: OwnedFd,
    base: *mut u8,
    map_len: usize,
    data_offset: usize,
    data_size: usize,
}

impl PerfRing {
    fn open(cpu: u32, data_bytes: usize) -> Result<Self, SidebandError> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            sample_type: PERF_SAMPLE_TID | PERF_SAMPLE_TIME,
            flags: ATTR_MMAP
                | ATTR_MMAP2
                | ATTR_MMAP_DATA
                | ATTR_COMM
                | ATTR_COMM_EXEC
                | ATTR_SAMPLE_ID_ALL
                | ATTR_USE_CLOCKID
                | ATTR_WATERMARK,
            // Nobody polls these fds (the ring buffer's wakeups drive the reads): wake rarely.
            wakeup_watermark: (data_bytes / 2) as u32,
            clockid: libc::CLOCK_MONOTONIC,
            ..PerfEventAttr::default()
        };
        let fd = open_on_cpu(&attr, cpu).map_err(|source| SidebandError::Open { cpu, source })?;
        let page = page_size();
        let map_len = page + data_bytes;
        // SAFETY: a fresh shared mapping of the perf fd, which the kernel sizes to one metadata
        // page plus a power-of-two number of data pages; checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SidebandError::Mmap {
                cpu,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = base.cast::<u8>();
        // SAFETY: the metadata page is mapped; these u64 fields are written by the kernel once
        // at mmap time (0 on kernels older than 4.1, where data follows the first page).
        let (offset, size) = unsafe {
            (
                std::ptr::read_volatile(base.add(DATA_OFFSET).cast::<u64>()) as usize,
                std::ptr::read_volatile(base.add(DATA_SIZE).cast::<u64>()) as usize,
            )
        };
        let (data_offset, data_size) = if size == 0 {
            (page, data_bytes)
        } else {
            (offset, size)
        };
        Ok(Self {
            _fd: fd,
            base,
            map_len,
            data_offset,
            data_size,
        })
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: data_head is an 8-byte aligned u64 in the mapped metadata page, which lives
        // as long as `self`; the kernel writes it, we only load it.
        unsafe { &*self.base.add(DATA_HEAD).cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as for `head`; data_tail is ours to write.
        unsafe { &*self.base.add(DATA_TAIL).cast::<AtomicU64>() }
    }

    /// Hands every complete record waiting in the ring to `each` (its type, misc and the bytes
    /// after the 8-byte header), then frees their space for the kernel.
    fn read(&mut self, scratch: &mut Vec<u8>, mut each: impl FnMut(u32, u16, &[u8])) {
        // Acquire: the records before head are fully written once we see head.
        let head = self.head().load(Ordering::Acquire);
        let mut tail = self.tail().load(Ordering::Relaxed);
        // SAFETY: the data area is mapped for `data_size` bytes from `data_offset`.
        let data =
            unsafe { std::slice::from_raw_parts(self.base.add(self.data_offset), self.data_size) };
        while tail < head {
            let at = (tail % self.data_size as u64) as usize;
            scratch.clear();
            copy_wrapped(data, at, 8, scratch);
            let kind = u32::from_ne_bytes([scratch[0], scratch[1], scratch[2], scratch[3]]);
            let misc = u16::from_ne_bytes([scratch[4], scratch[5]]);
            let size = u16::from_ne_bytes([scratch[6], scratch[7]]) as usize;
            if size < 8 || (head - tail) < size as u64 {
                // A corrupt header: skip what is there rather than loop forever.
                tail = head;
                break;
            }
            scratch.clear();
            copy_wrapped(data, at, size, scratch);
            each(kind, misc, &scratch[8..]);
            tail += size as u64;
        }
        // Release: our reads of the records happen before the kernel may overwrite them.
        self.tail().store(tail, Ordering::Release);
    }
}

impl Drop for PerfRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`, which nothing references now.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// Copies `len` bytes of a ring from `at`, wrapping at its end.
fn copy_wrapped(data: &[u8], at: usize, len: usize, out: &mut Vec<u8>) {
    let first = len.min(data.len() - at);
    out.extend_from_slice(&data[at..at + first]);
    out.extend_from_slice(&data[..len - first]);
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// The side-band of every online CPU.
pub struct Sideband {
    rings: Vec<PerfRing>,
    scratch: Vec<u8>,
    parser: Parser,
    /// Events of the last poll (kept for its capacity).
    events: Vec<SideEvent>,
}

/// All CPUs' buffers together take about this much (a fork storm writes ~2.5 KiB per exec).
const TOTAL_BYTES: usize = 4 << 20;

impl Sideband {
    pub fn open() -> Result<Self, SidebandError> {
        let cpus = aya::util::online_cpus()
            .map_err(|(what, e)| SidebandError::Cpus(format!("{what}: {e}")))?;
        let per_cpu = (TOTAL_BYTES / cpus.len().max(1))
            .clamp(64 << 10, 1 << 20)
            .next_power_of_two()
            .max(page_size());
        let rings = cpus
            .into_iter()
            .map(|cpu| PerfRing::open(cpu, per_cpu))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rings,
            scratch: Vec::with_capacity(4096),
            parser: Parser::default(),
            events: Vec::new(),
        })
    }

    /// Reads every waiting record of every CPU (each CPU's in time order).
    pub fn poll(&mut self) -> std::vec::Drain<'_, SideEvent> {
        let Self {
            rings,
            scratch,
            parser,
            events,
        } = self;
        for ring in rings.iter_mut() {
            ring.read(scratch, |kind, misc, body| {
                if let Some(ev) = parser.parse(kind, misc, body) {
                    events.push(ev);
                }
            });
        }
        events.drain(..)
    }

    /// Records the kernel could not write because a buffer was full.
    pub fn lost(&self) -> u64 {
        self.parser.lost
    }
}

/// Turns raw side-band records into events. Pure (no I/O), so it is tested on bytes.
#[derive(Default)]
pub struct Parser {
    /// Paths seen, shared by every VMA of one file.
    paths: HashSet<Arc<str>>,
    /// Records lost in the kernel (PERF_RECORD_LOST).
    pub lost: u64,
}

/// Interned paths kept before the set starts over (it bounds memory, not correctness).
const MAX_INTERNED_PATHS: usize = 16_384;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A NUL-terminated string in `bytes`.
fn c_str(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

impl Parser {
    /// The event in one record (`body`: the bytes after its 8-byte header), if it is one the
    /// collector uses.
    pub fn parse(&mut self, kind: u32, misc: u16, body: &[u8]) -> Option<SideEvent> {
        let trailer = body.len().checked_sub(SAMPLE_ID_LEN)?;
        let time_ns = u64_at(body, trailer + 8)?;
        match kind {
            PERF_RECORD_MMAP2 => {
                let pid = u32_at(body, 0)?;
                let (addr, len, pgoff) = (u64_at(body, 8)?, u64_at(body, 16)?, u64_at(body, 24)?);
                let ino = u64_at(body, 40)?;
                let (prot, flags) = (u32_at(body, 56)?, u32_at(body, 60)?);
                let name = String::from_utf8_lossy(c_str(body.get(64..trailer)?));
                let path = match name.as_ref() {
                    "//anon" | "" => None,
                    p => Some(self.intern(p.strip_suffix(" (deleted)").unwrap_or(p))),
                };
                let vma = Vma::from_perf(
                    addr,
                    addr.checked_add(len)?,
                    pgoff,
                    ino,
                    (prot & PROT_EXEC != 0, flags & MAP_SHARED != 0),
                    path,
                );
                Some(SideEvent {
                    time_ns,
                    pid,
                    kind: SideKind::Map(vma),
                })
            }
            PERF_RECORD_COMM => {
                let (pid, tid) = (u32_at(body, 0)?, u32_at(body, 4)?);
                let comm: Arc<str> =
                    Arc::from(String::from_utf8_lossy(c_str(body.get(8..trailer)?)).as_ref());
                let kind = if misc & PERF_RECORD_MISC_COMM_EXEC != 0 {
                    SideKind::Exec { comm }
                } else if pid == tid {
                    SideKind::Rename { comm }
                } else {
                    // A thread's own name: processes are named by their main thread.
                    return None;
                };
                Some(SideEvent { time_ns, pid, kind })
            }
            PERF_RECORD_LOST => {
                self.lost += u64_at(body, 8)?;
                None
            }
            _ => None,
        }
    }

    fn intern(&mut self, path: &str) -> Arc<str> {
        if let Some(p) = self.paths.get(path) {
            return p.clone();
        }
        if self.paths.len() >= MAX_INTERNED_PATHS {
            self.paths.clear();
        }
        let p: Arc<str> = Arc::from(path);
        self.paths.insert(p.clone());
        p
    }
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of ring-buffer and side-band records.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrspace::MappingClass;

    /// A record body as the kernel writes it: fields, then the sample_id trailer.
    fn body(fields: &[u8], pid: u32, time: u64) -> Vec<u8> {
        let mut b = fields.to_vec();
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&time.to_ne_bytes());
        b
    }

    #[allow(clippy::too_many_arguments)]
    fn mmap2(
        pid: u32,
        addr: u64,
        len: u64,
        pgoff: u64,
        ino: u64,
        prot: u32,
        flags: u32,
        name: &str,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&pid.to_ne_bytes());
        f.extend_from_slice(&pid.to_ne_bytes());
        for v in [addr, len, pgoff] {
            f.extend_from_slice(&v.to_ne_bytes());
        }
        f.extend_from_slice(&[0u8; 8]); // maj, min
        f.extend_from_slice(&ino.to_ne_bytes());
        f.extend_from_slice(&0u64.to_ne_bytes()); // ino_generation
        f.extend_from_slice(&prot.to_ne_bytes());
        f.extend_from_slice(&flags.to_ne_bytes());
        f.extend_from_slice(name.as_bytes());
        f.push(0);
        f
    }

    fn map_of(ev: Option<SideEvent>) -> (u32, u64, Vma) {
        match ev {
            Some(SideEvent {
                pid,
                time_ns,
                kind: SideKind::Map(v),
            }) => (pid, time_ns, v),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_mappings_of_every_kind() {
        let mut p = Parser::default();
        let rec = body(
            &mmap2(42, 0x5000, 0x4000, 0x2000, 77, 5, 2, "/usr/bin/true"),
            42,
            1234,
        );
        let (pid, time, v) = map_of(p.parse(PERF_RECORD_MMAP2, 0, &rec));
        assert_eq!((pid, time), (42, 1234));
        assert_eq!(
            (v.start, v.end, v.offset, v.exec),
            (0x5000, 0x9000, 0x2000, true)
        );
        assert_eq!(v.class, MappingClass::FilePrivate);
        assert_eq!(v.path.as_deref(), Some("/usr/bin/true"));

        let cases = [
            ("//anon", 0, 2, MappingClass::AnonPrivate, None),
            ("[stack]", 0, 2, MappingClass::Stack, Some("[stack]")),
            ("[heap]", 0, 2, MappingClass::Heap, Some("[heap]")),
            ("[vdso]", 0, 2, MappingClass::Other, Some("[vdso]")),
            (
                "/dev/zero (deleted)",
                9,
                1,
                MappingClass::AnonShared,
                Some("/dev/zero"),
            ),
            (
                "/memfd:buf (deleted)",
                9,
                1,
                MappingClass::AnonShared,
                Some("/memfd:buf"),
            ),
            (
                "/var/db/file",
                9,
                1,
                MappingClass::FileShared,
                Some("/var/db/file"),
            ),
        ];
        for (name, ino, flags, class, path) in cases {
            let rec = body(&mmap2(1, 0x1000, 0x1000, 0x1000, ino, 3, flags, name), 1, 5);
            let (_, _, v) = map_of(p.parse(PERF_RECORD_MMAP2, 0, &rec));
            assert_eq!((v.class, v.path.as_deref()), (class, path), "{name}");
            assert!(!v.exec);
            if path.is_none() {
                assert_eq!(v.offset, 0, "anonymous memory has no file offset");
            }
        }
        // One path, one allocation.
        let a = map_of(p.parse(PERF_RECORD_MMAP2, 0, &rec_of("/lib/x.so")));
        let b = map_of(p.parse(PERF_RECORD_MMAP2, 0, &rec_of("/lib/x.so")));
        assert!(Arc::ptr_eq(
            a.2.path.as_ref().expect("path"),
            b.2.path.as_ref().expect("path")
        ));
    }

    fn rec_of(name: &str) -> Vec<u8> {
        body(&mmap2(1, 0x1000, 0x1000, 0, 5, 5, 2, name), 1, 9)
    }

    #[test]
    fn parses_exec_renames_and_losses() {
        let mut p = Parser::default();
        let comm = |pid: u32, tid: u32, name: &str| {
            let mut f = Vec::new();
            f.extend_from_slice(&pid.to_ne_bytes());
            f.extend_from_slice(&tid.to_ne_bytes());
            f.extend_from_slice(name.as_bytes());
            f.push(0);
            body(&f, pid, 77)
        };
        assert_eq!(
            p.parse(
                PERF_RECORD_COMM,
                PERF_RECORD_MISC_COMM_EXEC,
                &comm(9, 9, "true")
            ),
            Some(SideEvent {
                time_ns: 77,
                pid: 9,
                kind: SideKind::Exec {
                    comm: Arc::from("true")
                }
            })
        );
        assert!(matches!(
            p.parse(PERF_RECORD_COMM, 0, &comm(9, 9, "worker")),
            Some(SideEvent {
                kind: SideKind::Rename { .. },
                ..
            })
        ));
        assert_eq!(p.parse(PERF_RECORD_COMM, 0, &comm(9, 10, "thread")), None);
        let mut lost = Vec::new();
        lost.extend_from_slice(&1u64.to_ne_bytes());
        lost.extend_from_slice(&12u64.to_ne_bytes());
        assert_eq!(p.parse(PERF_RECORD_LOST, 0, &body(&lost, 0, 1)), None);
        assert_eq!(p.lost, 12);
        // Truncated records are dropped, not misread.
        assert_eq!(p.parse(PERF_RECORD_MMAP2, 0, &[0u8; 20]), None);
    }

    #[test]
    fn copies_records_across_the_ring_end() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut out = Vec::new();
        copy_wrapped(&data, 6, 4, &mut out);
        assert_eq!(out, [7, 8, 1, 2]);
        out.clear();
        copy_wrapped(&data, 0, 8, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn attr_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 136);
    }
}
