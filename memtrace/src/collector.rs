//! Turns decoded records into attributed faults: keeps each process's address space current
//! and classifies every fault by the mapping it hit.
use std::{collections::HashMap, sync::Arc, time::Instant};

use memtrace_common::{
    FaultRecord, ProcRecord, VmaRecord, FAULT_HAS_ENTRY, FAULT_KERNEL_MODE, FAULT_MAJOR, PROC_EXEC,
    PROC_EXIT, PROC_FORK, VMA_BRK, VMA_MMAP, VMA_MREMAP, VMA_MUNMAP,
};

use crate::{
    addrspace::{fd_path, mmap_flags, AddressSpace, MappingClass},
    fault::{decode_error_code, Fault, FaultAggregate, FaultKind},
    record::{comm_str, Record},
};

/// What the agent knows of one process; kept after it exits so its stacks still symbolize.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub comm: String,
    pub space: AddressSpace,
    pub exited: bool,
    /// When /proc/PID/maps was last re-read (`None` since first sight), to bound the re-reads
    /// an unknown address triggers.
    last_read: Option<Instant>,
}

/// Where processes' maps and names come from: `/proc` in production, a fake in tests.
pub trait ProcSource {
    fn maps(&self, pid: u32) -> Option<AddressSpace>;
    fn comm(&self, pid: u32) -> Option<String>;
    fn fd_path(&self, pid: u32, fd: i32) -> Option<Arc<str>>;
}

pub struct Procfs;

impl ProcSource for Procfs {
    fn maps(&self, pid: u32) -> Option<AddressSpace> {
        AddressSpace::read(pid).ok()
    }
    fn comm(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim_end().to_string())
    }
    fn fd_path(&self, pid: u32, fd: i32) -> Option<Arc<str>> {
        fd_path(pid, fd)
    }
}

#[derive(Default, Debug, Clone, Copy)]
pub struct CollectorStats {
    pub records: u64,
    pub undecodable: u64,
    pub unclassified: u64,
}

pub struct Collector<S: ProcSource = Procfs> {
    source: S,
    pub processes: HashMap<u32, ProcessInfo>,
    pub faults: FaultAggregate,
    pub stats: CollectorStats,
    /// Forked or exec'd pids seen, for following a traced command's descendants.
    pub spawned: Vec<u32>,
}

impl Default for Collector<Procfs> {
    fn default() -> Self {
        Self::new(Procfs)
    }
}

/// Re-read /proc/PID/maps on an address miss at most this often per process.
const REREAD_INTERVAL_MS: u128 = 20;

impl<S: ProcSource> Collector<S> {
    pub fn new(source: S) -> Self {
        Self {
            source,
            processes: HashMap::new(),
            faults: FaultAggregate::default(),
            stats: CollectorStats::default(),
            spawned: Vec::new(),
        }
    }

    /// Records a process as seen now (reads its maps and name), unless already known.
    pub fn observe(&mut self, pid: u32) -> &mut ProcessInfo {
        let source = &self.source;
        self.processes.entry(pid).or_insert_with(|| ProcessInfo {
            comm: source.comm(pid).unwrap_or_default(),
            space: source.maps(pid).unwrap_or_default(),
            exited: false,
            // The first unknown address may re-read at once: a process first seen in the
            // middle of an exec (a traced command held before it) has its new maps already.
            last_read: None,
        })
    }

    pub fn on_bytes(&mut self, bytes: &[u8]) {
        self.stats.records += 1;
        match crate::record::decode(bytes) {
            Some(rec) => self.on_record(rec),
            None => self.stats.undecodable += 1,
        }
    }

    pub fn on_record(&mut self, rec: Record) {
        match rec {
            Record::Fault(f) => self.on_fault(&f),
            Record::Vma(v) => self.on_vma(&v),
            Record::Proc(p) => self.on_proc(&p),
        }
    }

    /// Re-reads a live process's maps unless that was done within REREAD_INTERVAL_MS.
    fn reread(&mut self, pid: u32) -> bool {
        let recent = self
            .processes
            .get(&pid)
            .and_then(|p| p.last_read)
            .is_some_and(|t| t.elapsed().as_millis() < REREAD_INTERVAL_MS);
        !recent && self.reread_now(pid)
    }

    /// Re-reads a live process's maps.
    fn reread_now(&mut self, pid: u32) -> bool {
        let Some(info) = self.processes.get_mut(&pid) else {
            return false;
        };
        if info.exited {
            return false;
        }
        info.last_read = Some(Instant::now());
        match self.source.maps(pid) {
            // A process that already exited (its exit record not read yet) shows an empty
            // maps file: its memory is gone, and the model built so far is the better record.
            Some(space) if !space.is_empty() => {
                info.space = space;
                true
            }
            _ => false,
        }
    }

    fn on_fault(&mut self, r: &FaultRecord) {
        self.observe(r.pid);
        // Only the class and path are needed: no VMA copy on this per-fault path.
        let lookup = |c: &Self| {
            c.processes[&r.pid]
                .space
                .find(r.address)
                .map(|v| (v.class, v.path.clone()))
        };
        let mut mapping = lookup(self);
        if mapping.is_none() && self.reread(r.pid) {
            mapping = lookup(self);
        }
        let (class, path) = mapping.unwrap_or_else(|| {
            self.stats.unclassified += 1;
            (MappingClass::Other, None)
        });
        let has_entry = r.flags & FAULT_HAS_ENTRY != 0;
        let (access, cause) = decode_error_code(has_entry.then_some(r.error_code));
        let fault = Fault {
            pid: r.pid,
            tid: r.tid,
            kind: if r.flags & FAULT_MAJOR != 0 {
                FaultKind::Major
            } else {
                FaultKind::Minor
            },
            kernel_mode: r.flags & FAULT_KERNEL_MODE != 0,
            address: r.address,
            latency_ns: has_entry.then_some(r.latency_ns),
            access,
            cause,
            user_stack: u32::try_from(r.user_stack_id).ok(),
            kernel_stack: u32::try_from(r.kernel_stack_id).ok(),
            class,
            path,
        };
        self.faults.record(&fault);
    }

    fn on_vma(&mut self, r: &VmaRecord) {
        self.observe(r.pid);
        match r.op {
            VMA_MMAP => {
                let anonymous = r.flags & mmap_flags::MAP_ANONYMOUS != 0;
                // The fd may be closed (and its number reused) by the time this record is read,
                // so a file mapping's path comes from a fresh /proc/PID/maps while the process
                // lives, and from the fd only when that read shows nothing for the range.
                if !anonymous
                    && self.reread_now(r.pid)
                    && self.space_mut(r.pid).find(r.addr).is_some()
                {
                    return;
                }
                let path = if anonymous {
                    None
                } else {
                    self.source.fd_path(r.pid, r.fd)
                };
                self.space_mut(r.pid)
                    .apply_mmap(r.addr, r.len, r.flags, r.offset, path);
            }
            VMA_MUNMAP => self.space_mut(r.pid).apply_munmap(r.addr, r.len),
            VMA_MREMAP => self
                .space_mut(r.pid)
                .apply_mremap(r.addr, r.len, r.new_addr, r.new_len),
            VMA_BRK => self.space_mut(r.pid).apply_brk(r.addr),
            _ => {}
        }
    }

    fn space_mut(&mut self, pid: u32) -> &mut AddressSpace {
        &mut self.observe(pid).space
    }

    fn on_proc(&mut self, r: &ProcRecord) {
        match r.op {
            PROC_FORK => {
                // The child starts as a copy of its parent's address space.
                let parent = self.observe(r.pid).clone();
                let child = ProcessInfo {
                    exited: false,
                    last_read: None,
                    ..parent
                };
                self.processes.insert(r.child_pid, child);
                self.spawned.push(r.child_pid);
            }
            PROC_EXEC => {
                let source = &self.source;
                let info = self.processes.entry(r.pid).or_default();
                info.comm = comm_str(&r.comm);
                info.space = source.maps(r.pid).unwrap_or_default();
                info.last_read = Some(Instant::now());
                info.exited = false;
                self.spawned.push(r.pid);
            }
            PROC_EXIT => {
                self.observe(r.pid).exited = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::RecordKind;

    struct Fake;
    impl ProcSource for Fake {
        fn maps(&self, pid: u32) -> Option<AddressSpace> {
            (pid == 1).then(|| {
                AddressSpace::from_maps(
                    "00400000-00500000 r-xp 00000000 08:01 5 /bin/app\n\
                     01000000-01100000 rw-p 00000000 00:00 0 [heap]\n",
                )
            })
        }
        fn comm(&self, pid: u32) -> Option<String> {
            (pid == 1).then(|| "app".to_string())
        }
        fn fd_path(&self, _pid: u32, fd: i32) -> Option<Arc<str>> {
            (fd == 3).then(|| Arc::from("/data/file"))
        }
    }

    /// /proc of a process that has exited but not been reaped: every maps file is empty.
    struct Exited;
    impl ProcSource for Exited {
        fn maps(&self, _pid: u32) -> Option<AddressSpace> {
            Some(AddressSpace::default())
        }
        fn comm(&self, _pid: u32) -> Option<String> {
            None
        }
        fn fd_path(&self, _pid: u32, _fd: i32) -> Option<Arc<str>> {
            None
        }
    }

    /// A private 64 KiB mapping of fd 3 at `addr`.
    fn file_mmap(pid: u32, addr: u64, offset: u64) -> Record {
        Record::Vma(VmaRecord {
            kind: RecordKind::Vma as u32,
            op: VMA_MMAP,
            pid,
            addr,
            len: 0x10000,
            flags: 0x02,
            fd: 3,
            offset,
            ..Default::default()
        })
    }

    fn fault(pid: u32, address: u64, flags: u32) -> Record {
        Record::Fault(FaultRecord {
            kind: RecordKind::Fault as u32,
            flags: flags | FAULT_HAS_ENTRY,
            pid,
            tid: pid,
            address,
            error_code: 0x6,
            latency_ns: 500,
            user_stack_id: 3,
            kernel_stack_id: -14,
            ..Default::default()
        })
    }

    #[test]
    fn an_exited_process_keeps_its_model() {
        // Records are read after the fact: a short-lived process may be gone when its file
        // mmap record arrives, and the re-read of its maps then finds nothing.
        let mut c = Collector::new(Exited);
        c.processes.insert(
            1,
            ProcessInfo {
                comm: "app".into(),
                space: AddressSpace::from_maps(
                    "01000000-01100000 rw-p 00000000 00:00 0 [heap]\n\
                     7f0000000000-7f0000200000 r-xp 00000000 08:01 7 /lib/libc.so.6\n",
                ),
                ..Default::default()
            },
        );
        c.on_record(file_mmap(1, 0x7000_0000, 0));
        c.on_record(fault(1, 0x0100_0010, 0));
        c.on_record(fault(1, 0x7f00_0000_1000, 0));
        c.on_record(fault(1, 0x7000_1000, 0));
        assert_eq!(c.stats.unclassified, 0);
        let classes: std::collections::HashSet<MappingClass> =
            c.faults.callsites.keys().map(|k| k.class).collect();
        assert_eq!(
            classes,
            [MappingClass::Heap, MappingClass::FilePrivate].into()
        );
    }

    #[test]
    fn classifies_faults_through_mmap_fork_and_exit() {
        let mut c = Collector::new(Fake);
        c.on_record(fault(1, 0x0100_0010, 0));
        c.on_record(file_mmap(1, 0x7000_0000, 0x2000));
        c.on_record(fault(1, 0x7000_1000, FAULT_MAJOR));
        c.on_record(Record::Proc(ProcRecord {
            kind: RecordKind::Proc as u32,
            op: PROC_FORK,
            pid: 1,
            child_pid: 2,
            ..Default::default()
        }));
        // The child inherits the parent's mappings even though /proc has nothing for it.
        c.on_record(fault(2, 0x7000_2000, 0));
        c.on_record(Record::Proc(ProcRecord {
            kind: RecordKind::Proc as u32,
            op: PROC_EXIT,
            pid: 2,
            child_pid: 2,
            ..Default::default()
        }));
        c.on_record(fault(1, 0x9999_0000, 0));

        let sites = &c.faults.callsites;
        let class_of = |pid: u32, kind: FaultKind| {
            sites
                .iter()
                .filter(|(k, _)| k.pid == pid && k.kind == kind)
                .map(|(k, v)| (k.class, k.path.as_deref().map(str::to_string), v.count))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            class_of(1, FaultKind::Major),
            vec![(MappingClass::FilePrivate, Some("/data/file".into()), 1)]
        );
        assert_eq!(
            class_of(2, FaultKind::Minor),
            vec![(MappingClass::FilePrivate, Some("/data/file".into()), 1)]
        );
        assert_eq!(c.processes[&2].comm, "app");
        assert!(c.processes[&2].exited);
        assert_eq!(c.faults.processes[&1].counts.minor, 2);
        assert_eq!(c.stats.unclassified, 1);
        let heap = sites
            .keys()
            .find(|k| k.pid == 1 && k.class == MappingClass::Heap)
            .expect("heap site");
        assert_eq!((heap.user_stack, heap.kernel_stack), (Some(3), None));
        assert_eq!(c.spawned, vec![2]);
    }
}
