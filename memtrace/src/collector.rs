//! The process table: turns decoded records into attributed faults. It owns every /proc read
//! and each process's model (name, address space, stacks), classifies every fault by the
//! mapping it hit, and keeps memory bounded: a process that exits is reduced to its totals and
//! its callsites with position-independent stacks, and past [`EXITED_ROWS`] exited processes
//! they fold into one row per command name.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::{
    collections::{hash_map::Entry, VecDeque},
    sync::Arc,
    time::Instant,
};

use memtrace_common::{
    stack_token_slot, thread_faults_since, BatchedFault, FaultRecord, ProcRecord, RecordKind,
    VmaRecord, FAULT_AT_ENTRY, FAULT_COMPLETION, FAULT_HAS_ENTRY, FAULT_KERNEL_MODE, FAULT_MAJOR,
    FAULT_SP_WORDS, FAULT_STACK_REUSED, FAULT_STACK_WALKED, PROC_EXEC, PROC_EXIT, PROC_FORK,
    VMA_BRK, VMA_MMAP, VMA_MREMAP, VMA_MUNMAP, VMA_SP_WORDS, VMA_STACK_REUSED, VMA_STACK_WALKED,
};

use crate::{
    addrspace::{fd_path, mmap_flags, AddressSpace, MappingClass},
    fault::{
        decode_error_code, CallsiteFaults, CallsiteKey, Cause, Fault, FaultKind, ProcessFaults,
    },
    record::{comm_str, frames_into, Record},
    sideband::{SideEvent, SideKind},
    stacks::{ReusedStacks, StackId, StackTable, StackTree, UserStack},
    unwind::UnwindCache,
    vma::{Ledger, SiteKey},
};

/// Merges a CFI unwind `cfi` with the frame-pointer walk `frames[..n_user]` (both innermost
/// first): the unwind goes through code without frame pointers but ends with the copied
/// stack; the walk may go on past it. From the deepest frame they share, the longer of the
/// two continues; with none shared, the longer one wins.
fn merge_unwound(cfi: &[u64], frames: &mut Vec<u64>, n_user: &mut usize) {
    if cfi.len() <= 1 {
        return;
    }
    let walk = &frames[..*n_user];
    let shared = cfi.iter().enumerate().skip(1).rev().find_map(|(i, ra)| {
        walk.iter()
            .skip(1)
            .position(|w| w == ra)
            .map(|j| (i, j + 1))
    });
    let merged: Vec<u64> = match shared {
        Some((i, j)) if walk.len() - j > cfi.len() - i => {
            cfi[..i].iter().chain(&walk[j..]).copied().collect()
        }
        Some(_) => cfi.to_vec(),
        None if cfi.len() > walk.len() => cfi.to_vec(),
        None => return,
    };
    let tail: Vec<u64> = frames[*n_user..].to_vec();
    *n_user = merged.len().min(memtrace_common::MAX_STACK_DEPTH);
    frames.clear();
    frames.extend(merged.into_iter().take(*n_user));
    frames.extend(tail);
}

/// `memtrace vma`'s ledger of mappings by callsite, fed by the collector after it has
/// applied each record to its model, and the ledger's own stack tree (never rebuilt, so the
/// ledger's stack ids stay valid for the whole run).
#[derive(Debug)]
pub struct VmaLedger {
    pub ledger: Ledger,
    pub stacks: StackTree,
    /// Mapping calls whose stack the tree had no room for (counted without it).
    pub stacks_full: u64,
    /// Calls that came without a user stack.
    pub no_stack: u64,
    /// Each process's name as of its last mapping call (its rows outlive it).
    pub comms: HashMap<u32, Arc<str>>,
    /// The last walk per (CPU, stack-cache slot): its token and stack, for the calls that
    /// reuse it (records of one CPU arrive in order, the walk first).
    last_walk: HashMap<(u32, u32), (u64, Option<StackId>)>,
    /// Calls that reused a walk the agent never got (its record was dropped).
    pub stack_unresolved: u64,
}

impl VmaLedger {
    pub fn new(keep_exited: bool) -> Self {
        Self {
            ledger: Ledger::new(keep_exited),
            stacks: StackTree::default(),
            stacks_full: 0,
            no_stack: 0,
            comms: HashMap::new(),
            last_walk: HashMap::new(),
            stack_unresolved: 0,
        }
    }
}

/// Exited processes kept as rows of their own; later ones fold into one row per name.
pub const EXITED_ROWS: usize = 256;
/// Exited processes of one name kept as rows of their own: a fork storm of one program folds
/// after these, and the rows stay for other programs.
pub const EXITED_ROWS_PER_NAME: usize = 8;
/// Callsites kept for live processes; past that, faults still count in their process's
/// totals and go to a callsite without stacks.
pub const MAX_CALLSITES: usize = 150_000;
/// Callsites kept for exited processes: past this, the smaller half lose their stacks
/// (see [`Collector::compact_exited`]). At least [`MAX_CALLSITES`], so one process that used
/// them all keeps them when it exits.
pub const MAX_EXITED_CALLSITES: usize = 150_000;
/// Distinct user stacks kept per live process.
pub const MAX_STACKS_PER_PROCESS: usize = 150_000;
/// Distinct kernel stacks kept for the run.
pub const MAX_KERNEL_STACKS: usize = 50_000;
/// Frames of the raw user stacks of all live processes together (8 bytes each): a few
/// compilers with deep, ever-new stacks must not take the host's memory. 100,000 distinct
/// stacks 40 frames deep fit.
pub const MAX_LIVE_STACK_FRAMES: usize = 4 << 20;
/// Frames of the kernel stacks kept for the run.
pub const MAX_KERNEL_STACK_FRAMES: usize = 1 << 20;

/// What the agent knows of one live process.
#[derive(Debug)]
pub struct ProcessInfo {
    pub comm: Arc<str>,
    pub space: AddressSpace,
    /// Its exit was seen, or /proc had nothing for it when it was first seen.
    pub exited: bool,
    /// When /proc/PID/maps was last re-read (`None` since first sight), to bound the re-reads
    /// an unknown address triggers.
    last_read: Option<Instant>,
    pub faults: ProcessFaults,
    /// Its user stacks, by index (callsite keys hold indices).
    pub stacks: StackTable,
    pub callsites: HashMap<CallsiteKey, CallsiteFaults>,
    /// Callsites from before its last exec, resolved against the image they ran in.
    pub earlier: HashMap<ResolvedKey, CallsiteFaults>,
    /// Between the side-band's exec record and the exec tracepoint: the image that called
    /// execve. The kernel-mode faults exec takes meanwhile (loading the new image, writing
    /// its stack) carry that image's user stack.
    before_exec: Option<AddressSpace>,
    /// Stacks in `stacks` already handed to the symbolizer ahead of a report.
    pub stacks_seen: usize,
    /// The kernel's counts when tracing of this process began (zero for a process forked
    /// while traced); `None` where that moment was not caught (first seen by a record).
    pub kernel_baseline: Option<KernelFaults>,
    /// With fault records at entry: each thread's last fault, until its next one settles it.
    threads: HashMap<u32, ThreadFaults>,
}

/// A thread's faults as recorded at entry.
#[derive(Debug, Default)]
struct ThreadFaults {
    /// A record of this thread was seen (`counts` is its reading).
    seen: bool,
    /// The thread's own (minor, major) counters as of its last record, packed
    /// ([`memtrace_common::pack_thread_faults`]).
    counts: u64,
    /// The fault of that record, waiting for the next to say whether the kernel accounted it.
    pending: Option<PendingFault>,
    /// That fault was counted without waiting (at an exec or a report).
    credited: bool,
}

/// A fault recorded at entry, attributed, not yet counted.
#[derive(Debug)]
struct PendingFault {
    fault: Fault,
    entry_ns: u64,
    /// The kernel's accounting was seen for it (`fault.kind` is then known).
    done: bool,
    calling_image_stack: Option<Option<StackId>>,
}

impl ProcessInfo {
    fn new(comm: Arc<str>, space: AddressSpace) -> Self {
        Self {
            comm,
            space,
            exited: false,
            last_read: None,
            faults: ProcessFaults::default(),
            stacks: StackTable::with_limit(MAX_STACKS_PER_PROCESS),
            callsites: HashMap::new(),
            earlier: HashMap::new(),
            before_exec: None,
            stacks_seen: 0,
            kernel_baseline: None,
            threads: HashMap::new(),
        }
    }
}

/// A callsite whose stacks no longer depend on an address space: it can outlive its process
/// and merge with the same callsite of other processes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedKey {
    pub kind: FaultKind,
    pub class: MappingClass,
    pub path: Option<Arc<str>>,
    pub user: Option<StackId>,
    /// Index in the collector's kernel stack table.
    pub kernel_stack: Option<u32>,
}

/// An exited process (or, with `pid` 0, every exited process of one name past the rows kept
/// for single processes): totals and resolved callsites, without address space, threads or
/// stacks.
#[derive(Debug, Default)]
pub struct ExitedProcess {
    pub pid: u32,
    pub comm: Arc<str>,
    /// How many processes this row holds.
    pub processes: u64,
    pub faults: ProcessFaults,
    pub callsites: HashMap<ResolvedKey, CallsiteFaults>,
}

/// Faults as the kernel counts them for a process (`/proc/PID/stat` minflt and majflt,
/// `getrusage`), faults it took on the process's behalf included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelFaults {
    pub minor: u64,
    pub major: u64,
}

impl KernelFaults {
    pub fn is_zero(&self) -> bool {
        self.minor == 0 && self.major == 0
    }

    pub fn since(self, baseline: KernelFaults) -> KernelFaults {
        KernelFaults {
            minor: self.minor.saturating_sub(baseline.minor),
            major: self.major.saturating_sub(baseline.major),
        }
    }
}

/// minflt and majflt from the text of `/proc/PID/stat`.
pub fn parse_stat_faults(stat: &str) -> Option<KernelFaults> {
    // After the parenthesised comm (which may hold spaces): state is field 3, minflt 10,
    // majflt 12.
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    let minor = fields.nth(7)?.parse().ok()?;
    let major = fields.nth(1)?.parse().ok()?;
    Some(KernelFaults { minor, major })
}

/// Where processes' maps and names come from: `/proc` in production, a fake in tests.
pub trait ProcSource {
    fn maps(&self, pid: u32) -> Option<AddressSpace>;
    fn comm(&self, pid: u32) -> Option<String>;
    fn fd_path(&self, pid: u32, fd: i32) -> Option<Arc<str>>;
    /// The kernel's fault counts for a live process.
    fn fault_counts(&self, _pid: u32) -> Option<KernelFaults> {
        None
    }
    /// A live thread's own fault counters, packed as fault records carry them.
    fn thread_fault_counts(&self, _pid: u32, _tid: u32) -> Option<u64> {
        None
    }
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
    fn fault_counts(&self, pid: u32) -> Option<KernelFaults> {
        parse_stat_faults(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
    fn thread_fault_counts(&self, pid: u32, tid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        let counts = parse_stat_faults(&stat)?;
        Some(memtrace_common::pack_thread_faults(
            counts.minor,
            counts.major,
        ))
    }
}

#[derive(Default, Debug, Clone, Copy)]
pub struct CollectorStats {
    pub records: u64,
    pub undecodable: u64,
    pub unclassified: u64,
    /// Faults that reused a walk whose record never arrived (dropped or of another process).
    pub stack_unresolved: u64,
    /// User stacks not kept because their process's stack table was full.
    pub stack_table_full: u64,
    /// Kernel stacks not kept because the kernel stack table was full.
    pub kernel_stack_table_full: u64,
    /// Faults attributed without stacks because the callsite table was full.
    pub callsite_table_full: u64,
    /// Side-band records the kernel dropped (its perf buffer was full).
    pub sideband_lost: u64,
    /// Faults below the main stack that grew it (no record reports stack growth).
    pub stack_grown: u64,
    /// Faults recorded at entry that the kernel did not account (it failed them: a bad
    /// address, a signal), so they are not counted.
    pub faults_unaccounted: u64,
    /// Completions whose entry record was not there to complete (lost, or before tracing).
    pub done_without_entry: u64,
    /// Faults whose user stack was a cached walk's (not walked again).
    pub stack_reused: u64,
}

pub struct Collector<S: ProcSource = Procfs> {
    source: S,
    /// Live processes (and ones whose exit is not yet processed).
    pub processes: HashMap<u32, ProcessInfo>,
    /// Exited processes, one row each, oldest first.
    pub exited: Vec<ExitedProcess>,
    /// Exited processes past [`EXITED_ROWS`] or [`EXITED_ROWS_PER_NAME`], one row per name.
    pub folded: HashMap<Arc<str>, ExitedProcess>,
    /// Rows in `exited` per name.
    exited_names: HashMap<Arc<str>, usize>,
    pub kernel_stacks: StackTable,
    /// Frames that live processes' stack tables may still add ([`MAX_LIVE_STACK_FRAMES`]).
    live_frames_left: usize,
    /// Frames the kernel stack table may still add.
    kernel_frames_left: usize,
    reused: ReusedStacks,
    /// Resolved user stacks of exited processes and of images before an exec.
    pub user_stacks: StackTree,
    /// Frames of the record being handled (reused, so no allocation per record).
    frames: Vec<u64>,
    /// Recovers the callers frameless functions hide from the frame-pointer walk.
    pub unwind: UnwindCache,
    live_callsites: usize,
    exited_callsites: usize,
    /// Exited callsites past which [`Collector::compact_exited`] runs.
    compact_exited_at: usize,
    last_sweep: Instant,
    pub stats: CollectorStats,
    /// Forked or exec'd pids that have not exited, for following a traced command's descendants.
    pub spawned: HashSet<u32>,
    /// Side-band events read but not applied yet, oldest first: each is applied just before
    /// the first ring record that is newer.
    side_pending: VecDeque<SideEvent>,
    /// The perf side-band feeds the model: exec and file mappings come from it, not from
    /// /proc reads after the fact.
    pub sideband: bool,
    /// Every process is traced (system-wide): a process first seen at its exec starts there,
    /// with nothing to read from /proc.
    pub follow_all: bool,
    /// An interval report was made: callsites also count what came since the last one
    /// (before the first, that is their totals).
    pub intervals: bool,
    /// `memtrace vma`: mappings by callsite.
    pub vma: Option<VmaLedger>,
    /// Completions that came before their fault's entry record, by tid.
    orphan_done: HashMap<u32, BatchedFault>,
    /// Fault records come through per-CPU batches, so they may arrive after a later record
    /// of another CPU: exits wait in the side-band queue, applied in time order.
    pub batched_faults: bool,
    /// The kernel's counts of the processes traced from now on (`-p`, the command) at the
    /// moment they were added: for a command, the faults its child took between fork and
    /// being followed.
    pub before_followed: KernelFaults,
    /// With batched fault records: how far records may settle the side-band queue (the
    /// oldest record still in a CPU's batch, as of the drain's start).
    pub settle_limit: u64,
}

impl Default for Collector<Procfs> {
    fn default() -> Self {
        Self::new(Procfs)
    }
}

/// The callsite at `key`, added if new while `count` (the table's callsites) is under
/// [`MAX_CALLSITES`]; past that, a new key is first `strip`ped of its stacks (so it merges
/// into one stackless callsite) and `true` says so. One hash lookup below the cap.
fn capped_entry<'m, K: std::hash::Hash + Eq>(
    map: &'m mut HashMap<K, CallsiteFaults>,
    mut key: K,
    count: &mut usize,
    strip: impl FnOnce(&mut K),
) -> (&'m mut CallsiteFaults, bool) {
    let stripped = *count >= MAX_CALLSITES && !map.contains_key(&key);
    if stripped {
        strip(&mut key);
    }
    let site = map.entry(key).or_insert_with(|| {
        *count += 1;
        CallsiteFaults::default()
    });
    (site, stripped)
}

/// Completions waiting for their entry record, at most.
const MAX_ORPHAN_DONE: usize = 1 << 16;

/// Side-band events waiting for ring records, at most.
const MAX_SIDE_PENDING: usize = 1 << 20;

/// How often [`Collector::sweep`] looks for processes to retire.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Re-read /proc/PID/maps on an address miss at most this often per process.
const REREAD_INTERVAL_MS: u128 = 20;

impl<S: ProcSource> Collector<S> {
    pub fn new(source: S) -> Self {
        Self {
            source,
            processes: HashMap::new(),
            exited: Vec::new(),
            folded: HashMap::new(),
            exited_names: HashMap::new(),
            kernel_stacks: StackTable::with_limit(MAX_KERNEL_STACKS),
            live_frames_left: MAX_LIVE_STACK_FRAMES,
            kernel_frames_left: MAX_KERNEL_STACK_FRAMES,
            reused: ReusedStacks::default(),
            user_stacks: StackTree::default(),
            // Room for both stacks and a recovered caller.
            frames: Vec::with_capacity(2 * memtrace_common::MAX_STACK_DEPTH + 1),
            unwind: UnwindCache::default(),
            live_callsites: 0,
            exited_callsites: 0,
            compact_exited_at: MAX_EXITED_CALLSITES,
            last_sweep: Instant::now(),
            stats: CollectorStats::default(),
            spawned: HashSet::new(),
            side_pending: VecDeque::new(),
            sideband: false,
            follow_all: false,
            intervals: false,
            vma: None,
            orphan_done: HashMap::new(),
            batched_faults: false,
            settle_limit: u64::MAX,
            before_followed: KernelFaults::default(),
        }
    }

    /// Queues side-band events (each CPU's in time order) to be applied in time order with
    /// the ring's records.
    pub fn queue_side(&mut self, events: impl IntoIterator<Item = SideEvent>) {
        let before = self.side_pending.len();
        self.side_pending.extend(events);
        if self.side_pending.len() > before {
            // Stable: one CPU's events keep their order where times tie.
            self.side_pending
                .make_contiguous()
                .sort_by_key(|e| e.time_ns);
        }
        // A ring that never drains must not let them pile up without bound.
        while self.side_pending.len() > MAX_SIDE_PENDING {
            if let Some(ev) = self.side_pending.pop_front() {
                self.on_side(ev);
            }
        }
    }

    /// Applies the queued side-band events up to `time_ns` (`CLOCK_MONOTONIC`): call it with
    /// the time a drain began once the ring is empty, as every record older than that is in.
    pub fn settle(&mut self, time_ns: u64) {
        while self
            .side_pending
            .front()
            .is_some_and(|e| e.time_ns <= time_ns)
        {
            if let Some(ev) = self.side_pending.pop_front() {
                self.on_side(ev);
            }
        }
    }

    /// Applies the queued side-band events of process `pid` up to `time_ns` (not its exit),
    /// ahead of the rest: a fault record whose address is unknown may be newer than the
    /// queue's limit (records still in other CPUs' batches hold it back).
    fn settle_pid(&mut self, pid: u32, time_ns: u64, with_exit: bool) -> bool {
        let mut applied = false;
        let mut i = 0;
        while i < self.side_pending.len() {
            let e = &self.side_pending[i];
            if e.time_ns > time_ns {
                break;
            }
            if e.pid == pid && (with_exit || !matches!(e.kind, SideKind::Exit { .. })) {
                if let Some(ev) = self.side_pending.remove(i) {
                    self.on_side(ev);
                    applied = true;
                }
            } else {
                i += 1;
            }
        }
        applied
    }

    fn on_side(&mut self, ev: SideEvent) {
        match ev.kind {
            SideKind::Map(vma) => {
                if let Some(info) = self.processes.get_mut(&ev.pid) {
                    info.space.apply_mapping(vma);
                }
            }
            SideKind::Exec { comm } => {
                if self.processes.contains_key(&ev.pid) {
                    self.resolve_callsites(ev.pid);
                } else if !self.follow_all {
                    return;
                }
                let info = self
                    .processes
                    .entry(ev.pid)
                    .or_insert_with(|| ProcessInfo::new(comm.clone(), AddressSpace::default()));
                // The new image's mappings follow in the side-band.
                info.before_exec = Some(std::mem::take(&mut info.space));
                info.comm = comm;
                info.exited = false;
                info.last_read = Some(Instant::now());
            }
            SideKind::Rename { comm } => {
                if let Some(info) = self.processes.get_mut(&ev.pid) {
                    info.comm = comm;
                }
            }
            SideKind::Exit { comm } => self.exit(ev.pid, ev.time_ns, comm),
        }
    }

    /// A process exited: its row keeps what it did.
    fn exit(&mut self, pid: u32, time_ns: u64, comm: Option<String>) {
        if let Some(vma) = self.vma.as_mut() {
            vma.ledger.exited(pid, time_ns);
        }
        self.retire(pid, comm);
    }

    /// Records a process as seen now (reads its maps and name), unless already known.
    pub fn observe(&mut self, pid: u32) -> &mut ProcessInfo {
        let source = &self.source;
        self.processes.entry(pid).or_insert_with(|| {
            let comm = source.comm(pid);
            let mut info = ProcessInfo::new(
                Arc::from(comm.as_deref().unwrap_or_default()),
                source.maps(pid).unwrap_or_default(),
            );
            // Gone already: its exit record is on the way, or was lost; `sweep` retires it.
            info.exited = comm.is_none();
            info
        })
    }

    /// Records a process traced from now on (a `-p` process, the traced command), with the
    /// kernel's counts so far, so its report can set the kernel's counts beside memtrace's.
    pub fn observe_from_now(&mut self, pid: u32) {
        let baseline = self.source.fault_counts(pid);
        if let Some(b) = baseline {
            self.before_followed.minor += b.minor;
            self.before_followed.major += b.major;
        }
        self.observe(pid).kernel_baseline = baseline;
    }

    /// The kernel's counts for a live process since tracing of it began, if known.
    pub fn kernel_faults(&self, pid: u32) -> Option<KernelFaults> {
        let info = self.processes.get(&pid).filter(|p| !p.exited)?;
        let baseline = info.kernel_baseline?;
        Some(self.source.fault_counts(pid)?.since(baseline))
    }

    pub fn on_bytes(&mut self, bytes: &[u8]) {
        match crate::record::decode(bytes) {
            Some(rec) => self.on_record(rec),
            None => {
                self.stats.records += 1;
                self.stats.undecodable += 1;
            }
        }
    }

    /// A ring record, after the side-band events older than it (up to `settle_limit`).
    pub fn on_record(&mut self, rec: Record<'_>) {
        if let Record::FaultBatch(records) = rec {
            for f in crate::record::batch_records(records) {
                self.on_batched(&f);
            }
            return;
        }
        self.stats.records += 1;
        self.settle(rec.time_ns().min(self.settle_limit));
        match rec {
            Record::Fault(f, frames) => self.on_fault(&f, frames),
            Record::Vma(v, frames) => self.on_vma(&v, frames),
            Record::Proc(p) => self.on_proc(&p),
            // Handled above.
            Record::FaultBatch(_) => {}
            // Not a faults record; never sent to this analysis's ring.
            Record::SlabStack(_) => {}
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

    fn on_fault(&mut self, r: &FaultRecord, frames: &[u8]) {
        let Some((fault, calling_image_stack)) = self.build_fault(r, frames) else {
            return;
        };
        if r.flags & FAULT_AT_ENTRY == 0 {
            // Sent at the kernel's accounting: counted as it is.
            self.record_fault(&fault, calling_image_stack);
            return;
        }
        // Sent at entry: the thread's previous fault is settled by how far its counters moved
        // since, and this one waits for its own settling.
        let previous = self.processes.get_mut(&r.pid).and_then(|info| {
            let thread = info.threads.entry(r.tid).or_default();
            let previous = (thread.seen).then(|| {
                (
                    thread.pending.take(),
                    thread.credited,
                    thread_faults_since(thread.counts, r.thread_faults),
                )
            });
            *thread = ThreadFaults {
                seen: true,
                counts: r.thread_faults,
                pending: Some(PendingFault {
                    fault,
                    entry_ns: r.time_ns,
                    done: false,
                    calling_image_stack,
                }),
                credited: false,
            };
            previous
        });
        if let Some((pending, credited, delta)) = previous {
            self.settle_previous(r.pid, pending, credited, delta, true);
        }
        if let Some(done) = self.orphan_done.remove(&r.tid) {
            if !self.complete(&done) {
                if done.time_ns < r.time_ns {
                    // This thread has moved on past it: its fault's entry will not come.
                    self.stats.done_without_entry += 1;
                } else {
                    self.orphan_done.insert(r.tid, done);
                }
            }
        }
    }

    /// Settles a thread's previous fault from what its counters grew by until its next
    /// fault (`None`: the tid names another thread now): the kernel accounted it if they
    /// grew (or a completion came for it); what they grew by beyond it, the kernel faulted in
    /// for the thread without an exception. `credited`: it was counted already (at an exec,
    /// exit or report that could not wait).
    fn settle_previous(
        &mut self,
        pid: u32,
        pending: Option<PendingFault>,
        credited: bool,
        delta: Option<(u32, u32)>,
        rest_faulted_in: bool,
    ) {
        let Some((mut minor, mut major)) = delta else {
            if let Some(p) = pending {
                self.record_fault(&p.fault, p.calling_image_stack);
            }
            return;
        };
        let mut take = |kind: FaultKind| match kind {
            FaultKind::Minor if minor > 0 => {
                minor -= 1;
                true
            }
            FaultKind::Major if major > 0 => {
                major -= 1;
                true
            }
            _ => false,
        };
        match pending {
            Some(mut p) => {
                let accounted = if p.done {
                    take(p.fault.kind);
                    true
                } else if take(FaultKind::Minor) {
                    true
                } else if take(FaultKind::Major) {
                    p.fault.kind = FaultKind::Major;
                    true
                } else {
                    false
                };
                if accounted {
                    self.record_fault(&p.fault, p.calling_image_stack);
                } else {
                    self.stats.faults_unaccounted += 1;
                }
            }
            None if credited && !take(FaultKind::Minor) && !take(FaultKind::Major) => {
                self.stats.faults_unaccounted += 1;
            }
            None => {}
        }
        if rest_faulted_in && minor + major > 0 {
            if let Some(info) = self.processes.get_mut(&pid) {
                let faults = &mut info.faults;
                faults.without_exception.minor += u64::from(minor);
                faults.without_exception.major += u64::from(major);
            }
        }
    }

    /// Records read from the CPUs' batches at the end of a run, oldest first.
    pub fn on_leftovers(&mut self, records: &[BatchedFault]) {
        for f in records {
            self.on_batched(f);
        }
    }

    /// A record from a CPU's batch: a fault's entry, or a completion.
    fn on_batched(&mut self, f: &BatchedFault) {
        self.stats.records += 1;
        self.settle(f.time_ns.min(self.settle_limit));
        if f.flags & FAULT_COMPLETION != 0 {
            self.on_fault_done(f);
            return;
        }
        let r = FaultRecord {
            kind: RecordKind::Fault as u32,
            flags: f.flags,
            pid: f.pid,
            tid: f.tid,
            address: f.address,
            time_ns: f.time_ns,
            stack_token: f.stack_token,
            error_code: f.error_code,
            thread_faults: f.thread_faults,
            ..FaultRecord::default()
        };
        self.on_fault(&r, &[]);
    }

    /// The kernel's accounting of a fault recorded at entry: its kind and, from the entry's
    /// time, its latency. A fault that slept and finished on another CPU may complete before
    /// its entry arrives (each CPU's batch goes out on its own): the completion waits for it.
    fn on_fault_done(&mut self, d: &BatchedFault) {
        if !self.complete(d) {
            if self.orphan_done.len() >= MAX_ORPHAN_DONE {
                self.stats.done_without_entry += self.orphan_done.len() as u64;
                self.orphan_done.clear();
            }
            if let Some(old) = self.orphan_done.insert(d.tid, *d) {
                let _ = old;
                self.stats.done_without_entry += 1;
            }
        }
    }

    /// Applies a completion to its thread's waiting fault, if that is the fault it completes.
    fn complete(&mut self, d: &BatchedFault) -> bool {
        let kind = if d.flags & FAULT_MAJOR != 0 {
            FaultKind::Major
        } else {
            FaultKind::Minor
        };
        let pending = self
            .processes
            .get_mut(&d.pid)
            .and_then(|info| info.threads.get_mut(&d.tid))
            .and_then(|t| t.pending.as_mut())
            .filter(|p| !p.done && (p.fault.address ^ d.address) < 4096 && p.entry_ns <= d.time_ns);
        let Some(p) = pending else {
            return false;
        };
        p.done = true;
        p.fault.kind = kind;
        p.fault.latency_ns = Some(d.time_ns - p.entry_ns);
        true
    }

    /// Counts every fault still waiting to be settled: a thread's last fault settles only at
    /// its next one. `settle` reads the thread's counters now (`/proc`) where it still runs;
    /// without it (an exec or exit, or a thread gone) the fault counts as accounted, which a
    /// failed last fault (a crash) makes one too many.
    pub fn flush_pending(&mut self, pid: Option<u32>, settle: bool) {
        let pids: Vec<u32> = match pid {
            Some(pid) => vec![pid],
            None => {
                // Completions still without their fault will not get it now.
                self.stats.done_without_entry += self.orphan_done.len() as u64;
                self.orphan_done.clear();
                self.processes.keys().copied().collect()
            }
        };
        for pid in pids {
            let Some(info) = self.processes.get_mut(&pid) else {
                continue;
            };
            let mut waiting = Vec::new();
            for (&tid, thread) in info.threads.iter_mut() {
                if let Some(p) = thread.pending.take() {
                    waiting.push((tid, p, thread.counts));
                    thread.credited = true;
                }
            }
            for (tid, p, counts) in waiting {
                let now = if settle {
                    self.source.thread_fault_counts(pid, tid)
                } else {
                    None
                };
                match now.and_then(|now| thread_faults_since(counts, now)) {
                    Some(delta) => {
                        if let Some(t) = self
                            .processes
                            .get_mut(&pid)
                            .and_then(|info| info.threads.get_mut(&tid))
                        {
                            // Settled for good: the next record's growth starts from here.
                            t.credited = false;
                            t.counts = now.unwrap_or(t.counts);
                        }
                        // Only whether it was accounted: what else the counters grew by since
                        // may be faults whose records are still on their way.
                        self.settle_previous(pid, Some(p), false, Some(delta), false);
                    }
                    None => self.record_fault(&p.fault, p.calling_image_stack),
                }
            }
        }
    }

    /// Everything a fault record says, attributed: its mapping, its stacks (interned), its
    /// access type. `None` when its process is gone from the table. The second value is the
    /// stack of the image that called execve, for the faults exec takes.
    fn build_fault(
        &mut self,
        r: &FaultRecord,
        frames: &[u8],
    ) -> Option<(Fault, Option<Option<StackId>>)> {
        self.observe(r.pid);
        // Only the class and path are needed: no VMA copy on this per-fault path.
        let lookup = |c: &Self| {
            c.processes
                .get(&r.pid)
                .and_then(|p| p.space.find(r.address))
                .map(|v| (v.class, v.path.clone()))
        };
        let mut mapping = lookup(self);
        if mapping.is_none() && self.settle_pid(r.pid, r.time_ns, false) {
            mapping = lookup(self);
        }
        if mapping.is_none() && self.space_mut(r.pid).grow_stack(r.address) {
            self.stats.stack_grown += 1;
            mapping = lookup(self);
        }
        if mapping.is_none() && self.reread(r.pid) {
            mapping = lookup(self);
        }
        let (class, path) = mapping.unwrap_or_else(|| {
            self.stats.unclassified += 1;
            (MappingClass::Other, None)
        });
        let info = self.processes.get_mut(&r.pid)?;
        let mut calling_image_stack = None;
        let (user_stack, kernel_stack) = if r.flags & FAULT_STACK_WALKED != 0 {
            frames_into(frames, &mut self.frames);
            let mut n_user = (r.n_user as usize).min(self.frames.len());
            // Before interning, so the faults that reuse this walk share the recovered frame.
            if r.flags & (FAULT_SP_WORDS | FAULT_KERNEL_MODE) == FAULT_SP_WORDS
                && self
                    .unwind
                    .recover_caller(&info.space, &r.sp_words, &mut self.frames, n_user)
            {
                n_user += 1;
            }
            let (user_ips, kernel_ips) = self.frames.split_at(n_user);
            if r.flags & FAULT_KERNEL_MODE != 0 {
                if let Some(image) = &info.before_exec {
                    // Taken by execve itself: the stack of the code that called it.
                    let stack = self
                        .user_stacks
                        .intern(&UserStack::resolve(image, user_ips));
                    if stack.is_none() {
                        self.stats.stack_table_full += 1;
                    }
                    calling_image_stack = Some(stack);
                }
            }
            let user = (!user_ips.is_empty() && calling_image_stack.is_none())
                .then(|| info.stacks.intern(user_ips, &mut self.live_frames_left))
                .and_then(|s| {
                    if s.is_none() {
                        self.stats.stack_table_full += 1;
                    }
                    s
                });
            if r.stack_token != 0 {
                self.reused.walked(r.stack_token, r.pid, user);
            }
            let kernel = (!kernel_ips.is_empty())
                .then(|| {
                    self.kernel_stacks
                        .intern(kernel_ips, &mut self.kernel_frames_left)
                })
                .and_then(|s| {
                    if s.is_none() {
                        self.stats.kernel_stack_table_full += 1;
                    }
                    s
                });
            (user, kernel)
        } else if r.flags & FAULT_STACK_REUSED != 0 {
            self.stats.stack_reused += 1;
            let user = self.reused.resolve(r.stack_token, r.pid);
            if user.is_none() {
                self.stats.stack_unresolved += 1;
            }
            (user, None)
        } else {
            (None, None)
        };
        let has_entry = r.flags & FAULT_HAS_ENTRY != 0;
        let (access, cause) = decode_error_code(has_entry.then_some(u64::from(r.error_code)));
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
            // A record at entry has none yet: its completion brings it, if it is measured.
            latency_ns: (has_entry && r.flags & FAULT_AT_ENTRY == 0).then_some(r.latency_ns),
            access,
            cause,
            user_stack,
            kernel_stack,
            class,
            path,
        };
        Some((fault, calling_image_stack))
    }

    /// Counts an accounted fault for its process, thread, mapping and callsite.
    fn record_fault(&mut self, fault: &Fault, calling_image_stack: Option<Option<StackId>>) {
        // A fault on a page not present (error code bit 0 clear) makes it resident: the
        // mapping's callsite caused that RSS. Without the entry, every fault counts.
        if let Some(vma) = self.vma.as_mut() {
            if fault.cause != Cause::Protection {
                vma.ledger.touched(fault.pid, fault.address);
            }
        }
        let Some(info) = self.processes.get_mut(&fault.pid) else {
            return;
        };
        info.faults.record(fault);
        if let Some(user) = calling_image_stack {
            // Already resolved: kept with the callsites of the image that called execve.
            let key = ResolvedKey {
                kind: fault.kind,
                class: fault.class,
                path: fault.path.clone(),
                user,
                kernel_stack: fault.kernel_stack,
            };
            info.earlier
                .entry(key)
                .or_default()
                .record(fault, self.intervals);
            return;
        }
        let (site, stripped) = capped_entry(
            &mut info.callsites,
            CallsiteKey::of(fault),
            &mut self.live_callsites,
            |k| {
                k.user_stack = None;
                k.kernel_stack = None;
            },
        );
        site.record(fault, self.intervals);
        if stripped {
            self.stats.callsite_table_full += 1;
        }
    }

    fn on_vma(&mut self, r: &VmaRecord, frames: &[u8]) {
        self.observe(r.pid);
        // What the model had before this call: the break, and the bytes a munmap unmaps.
        let before = match (&self.vma, self.processes.get(&r.pid)) {
            (Some(_), Some(p)) => match r.op {
                VMA_BRK => p.space.brk_end(),
                VMA_MUNMAP => Some(
                    p.space
                        .mapped_bytes_in(r.addr, r.addr.saturating_add((r.len + 4095) & !4095)),
                ),
                _ => None,
            },
            _ => None,
        };
        self.apply_vma(r);
        if self.vma.is_some() {
            self.ledger_vma(r, frames, before);
        }
    }

    /// Counts a VMA record in `memtrace vma`'s ledger, against the caller's stack and the
    /// kind of memory the model now has at the address.
    fn ledger_vma(&mut self, r: &VmaRecord, frames: &[u8], before: Option<u64>) {
        let (Some(vma), Some(info)) = (self.vma.as_mut(), self.processes.get(&r.pid)) else {
            return;
        };
        for pid in vma.ledger.comms_dropped.drain(..) {
            vma.comms.remove(&pid);
        }
        if vma.comms.get(&r.pid) != Some(&info.comm) {
            vma.comms.insert(r.pid, info.comm.clone());
        }
        let ledger = &mut vma.ledger;
        if r.op == VMA_MUNMAP {
            ledger.munmap(r.pid, r.addr, r.len, before);
            return;
        }
        let stack = if r.stack_flags & VMA_STACK_WALKED != 0 {
            let (copy, frames) = crate::record::vma_parts(r, frames);
            frames_into(frames, &mut self.frames);
            let mut n_user = usize::from(r.n_user).min(self.frames.len());
            if r.stack_flags & VMA_SP_WORDS != 0
                && self
                    .unwind
                    .recover_caller(&info.space, &r.sp_words, &mut self.frames, n_user)
            {
                n_user += 1;
            }
            // Where the CFI takes the unwind further than the frame-pointer walk (through
            // code without frame pointers), its frames, then the walk's from where they meet.
            if !copy.is_empty() {
                if let Some(&ip) = self.frames.first() {
                    let cfi = self
                        .unwind
                        .unwind(&info.space, ip, r.user_sp, r.user_bp, copy);
                    merge_unwound(&cfi, &mut self.frames, &mut n_user);
                }
            }
            let resolved = UserStack::resolve(&info.space, &self.frames[..n_user]);
            let id = vma.stacks.intern(&resolved);
            if id.is_none() {
                vma.stacks_full += 1;
            }
            if r.stack_token != 0 {
                vma.last_walk
                    .insert(stack_token_slot(r.stack_token), (r.stack_token, id));
            }
            id
        } else if r.stack_flags & VMA_STACK_REUSED != 0 {
            match vma.last_walk.get(&stack_token_slot(r.stack_token)) {
                Some(&(token, id)) if token == r.stack_token => id,
                _ => {
                    vma.stack_unresolved += 1;
                    None
                }
            }
        } else {
            vma.no_stack += 1;
            None
        };
        let at = match r.op {
            VMA_MREMAP => r.new_addr,
            _ => r.addr,
        };
        let (class, path) = match info.space.find(at) {
            Some(v) => (v.class, v.path.clone()),
            None if r.op == VMA_BRK => (MappingClass::Heap, None),
            None => (MappingClass::Other, None),
        };
        // The heap's pseudo-path says nothing the kind does not.
        let path = path.filter(|p| !p.starts_with('['));
        let key = SiteKey {
            pid: r.pid,
            class: if r.op == VMA_BRK {
                MappingClass::Heap
            } else {
                class
            },
            path,
            stack,
        };
        match r.op {
            VMA_MMAP => {
                let site = ledger.site(key);
                ledger.mmap(r.pid, r.addr, r.len, site, r.time_ns);
            }
            VMA_MREMAP => ledger.mremap(
                r.pid,
                (r.addr, r.len),
                (r.new_addr, r.new_len),
                |l| l.site(key),
                r.time_ns,
            ),
            VMA_BRK => ledger.brk(r.pid, r.addr, before, |l| l.site(key), r.time_ns),
            _ => {}
        }
    }

    /// Applies a VMA record to the process's model.
    fn apply_vma(&mut self, r: &VmaRecord) {
        match r.op {
            VMA_MMAP => {
                let anonymous = r.flags & mmap_flags::MAP_ANONYMOUS != 0;
                // The side-band reported this mapping with its path already; an anonymous
                // one is applied again for what only mmap's flags say (MAP_STACK).
                if self.sideband && !anonymous {
                    return;
                }
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
                    .apply_mmap(r.addr, r.len, (r.prot, r.flags), r.offset, path);
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
        if let Some(vma) = self.vma.as_mut() {
            match r.op {
                PROC_FORK => vma.ledger.forked(r.child_pid),
                PROC_EXEC => vma.ledger.exec(r.pid),
                _ => {}
            }
        }
        match r.op {
            PROC_FORK => {
                // A pid reused: what is still queued for its previous process (its exit, its
                // last mappings) belongs to that one, and goes first.
                if self.batched_faults {
                    self.settle_pid(r.child_pid, r.time_ns, true);
                }
                // The child starts as a copy of its parent's address space.
                let parent = self.observe(r.pid);
                let mut child = ProcessInfo::new(parent.comm.clone(), parent.space.clone());
                // The kernel starts a new process's counts at zero.
                child.kernel_baseline = Some(KernelFaults::default());
                if self.processes.contains_key(&r.child_pid) {
                    // A reused pid whose previous process's exit was never seen.
                    self.retire(r.child_pid, None);
                }
                self.processes.insert(r.child_pid, child);
                self.spawned.insert(r.child_pid);
            }
            PROC_EXEC if self.sideband => {
                // The side-band's exec record already reset the address space.
                let info = self.observe(r.pid);
                info.comm = Arc::from(comm_str(&r.comm));
                info.before_exec = None;
                self.spawned.insert(r.pid);
            }
            PROC_EXEC => {
                self.observe(r.pid);
                self.resolve_callsites(r.pid);
                let space = self.source.maps(r.pid).unwrap_or_default();
                if let Some(info) = self.processes.get_mut(&r.pid) {
                    info.comm = Arc::from(comm_str(&r.comm));
                    info.space = space;
                    info.last_read = Some(Instant::now());
                    info.exited = false;
                }
                self.spawned.insert(r.pid);
            }
            PROC_EXIT => {
                let comm = comm_str(&r.comm);
                let comm = (!comm.is_empty()).then_some(comm);
                if self.batched_faults {
                    // Its last faults on another CPU may still wait in that CPU's batch: the
                    // exit is applied once every record older than it is in.
                    self.queue_side([SideEvent {
                        time_ns: r.time_ns,
                        pid: r.pid,
                        kind: SideKind::Exit { comm },
                    }]);
                } else {
                    self.exit(r.pid, r.time_ns, comm);
                }
            }
            _ => {}
        }
    }

    /// Moves a process's callsites from stack indices to resolved stacks (before an exec
    /// replaces the address space they resolve against, or when it exits), and drops its
    /// stack table.
    fn resolve_callsites(&mut self, pid: u32) {
        // Waiting faults hold indices into the stack table about to go.
        self.flush_pending(Some(pid), false);
        let Some(info) = self.processes.get_mut(&pid) else {
            return;
        };
        // Exec and exit end every thread but the leader (whose counters go on: its next fault
        // also shows execve's own argument copy). A thread other than the leader that calls
        // execve takes the leader's tid with counters of its own: not told apart here (rare).
        info.threads.retain(|&tid, _| tid == pid);
        self.live_callsites = self.live_callsites.saturating_sub(info.callsites.len());
        // Each stack once (several callsites share one), then the raw stacks go before the
        // callsites are copied: both tables are never held beside the new one.
        let mut stack_ids: Vec<Option<StackId>> = Vec::with_capacity(info.stacks.len());
        let mut resolved = UserStack::default();
        for i in 0..info.stacks.len() as u32 {
            let stack = info.stacks.get(i).and_then(|ips| {
                resolved.resolve_into(&info.space, ips);
                self.user_stacks.intern(&resolved)
            });
            stack_ids.push(stack);
        }
        self.live_frames_left += info.stacks.frames();
        info.stacks = StackTable::with_limit(MAX_STACKS_PER_PROCESS);
        let callsites = std::mem::take(&mut info.callsites);
        info.earlier.reserve(callsites.len());
        for (key, faults) in callsites {
            let user = key.user_stack.and_then(|i| {
                let stack = stack_ids.get(i as usize).copied().flatten();
                if stack.is_none() {
                    // The tree is full: the faults keep their counts, not their stack.
                    self.stats.stack_table_full += faults.total.count;
                }
                stack
            });
            let resolved = ResolvedKey {
                kind: key.kind,
                class: key.class,
                path: key.path,
                user,
                kernel_stack: key.kernel_stack,
            };
            match info.earlier.entry(resolved) {
                Entry::Vacant(e) => {
                    e.insert(faults);
                }
                Entry::Occupied(mut e) => e.get_mut().merge(&faults),
            }
        }
        self.reused.forget(pid);
    }

    /// A process exited: keep its totals and resolved callsites, drop everything else.
    fn retire(&mut self, pid: u32, comm: Option<String>) {
        if let Some(vma) = self.vma.as_mut() {
            // Gone without an exit record read: it exited by now.
            vma.ledger.exited(pid, crate::sideband::monotonic_ns());
        }
        self.resolve_callsites(pid);
        self.spawned.remove(&pid);
        let Some(info) = self.processes.remove(&pid) else {
            return;
        };
        let comm: Arc<str> = match comm {
            Some(c) => Arc::from(c),
            None if info.comm.is_empty() => Arc::from("[unknown]"),
            None => info.comm,
        };
        let same_name = self.exited_names.entry(comm.clone()).or_default();
        if self.exited.len() < EXITED_ROWS && *same_name < EXITED_ROWS_PER_NAME {
            *same_name += 1;
            // A row of its own keeps the per-thread counts too, and its resolved callsites
            // become the row's as they are: no copy.
            self.exited_callsites += info.earlier.len();
            self.exited.push(ExitedProcess {
                pid,
                comm,
                processes: 1,
                faults: info.faults,
                callsites: info.earlier,
            });
        } else {
            let row = self
                .folded
                .entry(comm.clone())
                .or_insert_with(|| ExitedProcess {
                    pid: 0,
                    comm,
                    ..ExitedProcess::default()
                });
            row.processes += 1;
            row.faults.merge(&info.faults);
            for (key, site) in info.earlier {
                row.callsites
                    .entry(key)
                    .or_insert_with(|| {
                        self.exited_callsites += 1;
                        CallsiteFaults::default()
                    })
                    .merge(&site);
            }
        }
        if self.exited_callsites > self.compact_exited_at {
            self.compact_exited();
        }
    }

    /// Keeps the callsites of exited processes under [`MAX_EXITED_CALLSITES`] on a host that runs
    /// many different programs: the smaller half of them (by faults) lose their stacks and
    /// merge into one stackless callsite per row, kind and mapping. Their faults still count
    /// everywhere but in a callsite with a stack, and the loss table says how many; the
    /// callsites that matter, the big ones, keep theirs.
    fn compact_exited(&mut self) {
        let mut counts: Vec<u64> = self
            .exited
            .iter()
            .chain(self.folded.values())
            .flat_map(|row| row.callsites.values().map(|c| c.total.count))
            .collect();
        if counts.is_empty() {
            return;
        }
        let middle = counts.len() / 2;
        let (_, &mut threshold, _) = counts.select_nth_unstable(middle);
        drop(counts);
        let mut kept = 0;
        for row in self.exited.iter_mut().chain(self.folded.values_mut()) {
            let small: Vec<(ResolvedKey, CallsiteFaults)> = row
                .callsites
                .extract_if(|k, c| {
                    c.total.count <= threshold && (k.user.is_some() || k.kernel_stack.is_some())
                })
                .collect();
            for (mut key, site) in small {
                key.user = None;
                key.kernel_stack = None;
                self.stats.callsite_table_full += site.total.count;
                row.callsites.entry(key).or_default().merge(&site);
            }
            row.callsites.shrink_to_fit();
            kept += row.callsites.len();
        }
        self.exited_callsites = kept;
        // Stackless callsites cannot be compacted further: if they alone are many, the next
        // compaction waits until there is something to gain, not the next exit.
        self.compact_exited_at = MAX_EXITED_CALLSITES.max(kept + MAX_EXITED_CALLSITES / 4);
        self.rebuild_stack_tree();
    }

    /// Rebuilds the resolved-stack tree with only the stacks callsites still refer to, and
    /// renames them in every callsite that does.
    fn rebuild_stack_tree(&mut self) {
        let tables = self
            .exited
            .iter_mut()
            .chain(self.folded.values_mut())
            .map(|row| &mut row.callsites)
            .chain(self.processes.values_mut().map(|p| &mut p.earlier));
        let mut tables: Vec<&mut HashMap<ResolvedKey, CallsiteFaults>> = tables.collect();
        let keep = tables
            .iter()
            .flat_map(|t| t.keys().filter_map(|k| k.user))
            .collect::<Vec<_>>();
        let (tree, ids) = self.user_stacks.rebuilt(keep);
        self.user_stacks = tree;
        for table in tables.iter_mut() {
            let old = std::mem::take(&mut **table);
            for (mut key, site) in old {
                key.user = key.user.and_then(|id| ids.get(&id).copied());
                table.entry(key).or_default().merge(&site);
            }
        }
    }

    /// Retires processes that turned out to be gone without an exit record (exited before
    /// memtrace first saw them, or whose exit record was lost), and frees stacks no callsite
    /// refers to any more. Call between batches of records: it does its work once a second.
    pub fn sweep(&mut self) {
        if self.last_sweep.elapsed() < SWEEP_INTERVAL {
            return;
        }
        self.sweep_now();
    }

    /// Table sizes, for finding where the agent's memory goes (`MEMTRACE_FOOTPRINT=1`).
    pub fn footprint(&self) -> String {
        let live_stacks: usize = self.processes.values().map(|p| p.stacks.len()).sum();
        let exited_sites: usize = self.exited.iter().map(|e| e.callsites.len()).sum::<usize>()
            + self
                .folded
                .values()
                .map(|e| e.callsites.len())
                .sum::<usize>();
        format!(
            "processes {} live_stacks {} live_frames {} live_callsites {} exited_rows {} \
             folded_rows {} exited_callsites {} stack_tree_nodes {} kernel_stacks {}",
            self.processes.len(),
            live_stacks,
            MAX_LIVE_STACK_FRAMES - self.live_frames_left,
            self.live_callsites,
            self.exited.len(),
            self.folded.len(),
            exited_sites,
            self.user_stacks.len(),
            self.kernel_stacks.len()
        )
    }

    /// Starts the next interval after an interval report: what every callsite saw since the
    /// last one is dropped (the report has shown it), and from now on callsites count it.
    pub fn end_interval(&mut self) {
        self.intervals = true;
        let live = self
            .processes
            .values_mut()
            .flat_map(|p| p.callsites.values_mut().chain(p.earlier.values_mut()));
        let exited = self
            .exited
            .iter_mut()
            .chain(self.folded.values_mut())
            .flat_map(|row| row.callsites.values_mut());
        for site in live.chain(exited) {
            site.interval = None;
        }
    }

    fn sweep_now(&mut self) {
        self.last_sweep = Instant::now();
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| p.exited)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            self.retire(pid, None);
        }
        if self.user_stacks.crowded() {
            self.rebuild_stack_tree();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memtrace_common::{stack_token, RecordKind};

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
            (pid == 1 || pid == 7).then(|| "app".to_string())
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
            Some("app".into())
        }
        fn fd_path(&self, _pid: u32, _fd: i32) -> Option<Arc<str>> {
            None
        }
    }

    /// A private 64 KiB mapping of fd 3 at `addr`.
    fn file_mmap(pid: u32, addr: u64, offset: u64) -> Record<'static> {
        Record::Vma(
            VmaRecord {
                kind: RecordKind::Vma as u32,
                op: VMA_MMAP,
                pid,
                addr,
                len: 0x10000,
                flags: 0x02,
                fd: 3,
                offset,
                ..Default::default()
            },
            &[],
        )
    }

    fn fault_rec(pid: u32, address: u64, flags: u32) -> FaultRecord {
        FaultRecord {
            kind: RecordKind::Fault as u32,
            flags: flags | FAULT_HAS_ENTRY,
            pid,
            tid: pid,
            address,
            error_code: 0x6,
            latency_ns: 500,
            ..Default::default()
        }
    }

    /// A fault's record at entry, from thread `tid` of process 1 whose counters read
    /// (`minor`, `major`) as it began.
    fn entry(tid: u32, address: u64, time_ns: u64, minor: u64, major: u64) -> BatchedFault {
        BatchedFault {
            flags: FAULT_AT_ENTRY | FAULT_HAS_ENTRY,
            pid: 1,
            tid,
            error_code: 0x6,
            address,
            time_ns,
            stack_token: 0,
            thread_faults: memtrace_common::pack_thread_faults(minor, major),
        }
    }

    fn completion(tid: u32, address: u64, time_ns: u64, major: bool) -> BatchedFault {
        BatchedFault {
            flags: FAULT_COMPLETION | if major { FAULT_MAJOR } else { 0 },
            pid: 1,
            tid,
            address,
            time_ns,
            ..BatchedFault::default()
        }
    }

    fn batch(records: &[BatchedFault]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|r| {
                // SAFETY: `BatchedFault` is Pod (no padding); the slice covers exactly `r`.
                unsafe {
                    std::slice::from_raw_parts(
                        (r as *const BatchedFault).cast::<u8>(),
                        std::mem::size_of::<BatchedFault>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    fn fault(pid: u32, address: u64, flags: u32) -> Record<'static> {
        Record::Fault(fault_rec(pid, address, flags), &[])
    }

    fn proc_rec(op: u32, pid: u32, child_pid: u32) -> Record<'static> {
        proc_rec_at(op, pid, child_pid, 0)
    }

    fn proc_rec_at(op: u32, pid: u32, child_pid: u32, time_ns: u64) -> Record<'static> {
        Record::Proc(ProcRecord {
            kind: RecordKind::Proc as u32,
            op,
            pid,
            child_pid,
            time_ns,
            ..Default::default()
        })
    }

    /// A walked fault's record bytes: the header, then its user frames.
    fn walked(pid: u32, address: u64, token: u64, ips: &[u64]) -> Vec<u8> {
        walked_rec(
            FaultRecord {
                flags: FAULT_HAS_ENTRY | FAULT_STACK_WALKED,
                stack_token: token,
                ..fault_rec(pid, address, 0)
            },
            ips,
        )
    }

    /// `rec`'s bytes followed by its user frames `ips`.
    fn walked_rec(rec: FaultRecord, ips: &[u64]) -> Vec<u8> {
        let rec = FaultRecord {
            n_user: ips.len() as u16,
            ..rec
        };
        // SAFETY: FaultRecord is Pod: no padding, every byte initialized.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const FaultRecord).cast::<u8>(),
                std::mem::size_of::<FaultRecord>(),
            )
        }
        .to_vec();
        for ip in ips {
            bytes.extend_from_slice(&ip.to_ne_bytes());
        }
        bytes
    }

    fn reused(pid: u32, address: u64, token: u64) -> Record<'static> {
        Record::Fault(
            FaultRecord {
                flags: FAULT_HAS_ENTRY | FAULT_STACK_REUSED,
                stack_token: token,
                ..fault_rec(pid, address, 0)
            },
            &[],
        )
    }

    fn side(time_ns: u64, pid: u32, kind: SideKind) -> SideEvent {
        SideEvent { time_ns, pid, kind }
    }

    fn side_map(time_ns: u64, pid: u32, start: u64, exec: bool, path: Option<&str>) -> SideEvent {
        let vma = crate::addrspace::Vma::from_perf(
            start,
            start + 0x10000,
            0,
            u64::from(path.is_some()),
            (exec, false),
            path.map(Arc::from),
        );
        side(time_ns, pid, SideKind::Map(vma))
    }

    fn timed_fault(pid: u32, address: u64, time_ns: u64) -> Vec<u8> {
        walked_rec(
            FaultRecord {
                time_ns,
                ..fault_rec(pid, address, 0)
            },
            &[],
        )
    }

    /// A kernel-mode fault at `time_ns` whose user stack is the one frame `user_ip`.
    fn kernel_mode_fault(pid: u32, address: u64, time_ns: u64, user_ip: u64) -> Vec<u8> {
        walked_rec(
            FaultRecord {
                flags: FAULT_HAS_ENTRY | FAULT_STACK_WALKED | FAULT_KERNEL_MODE,
                time_ns,
                ..fault_rec(pid, address, 0)
            },
            &[user_ip],
        )
    }

    fn class_of(c: &Collector<Fake>, pid: u32, address: u64) -> Option<MappingClass> {
        c.processes
            .get(&pid)
            .and_then(|p| p.space.find(address))
            .map(|v| v.class)
    }

    #[test]
    fn a_cfi_unwind_and_a_frame_pointer_walk_merge() {
        // The walk lost its way in libc (2 frames); the unwind went through it.
        let mut frames = vec![1, 2, 0xffff_ffff_8100_0000];
        let mut n = 2;
        merge_unwound(&[1, 2, 3, 4, 5], &mut frames, &mut n);
        assert_eq!(
            (&frames[..n], &frames[n..]),
            (&[1, 2, 3, 4, 5][..], &[0xffff_ffff_8100_0000][..])
        );
        // The unwind ended with the copied stack at 4; the walk goes on past it.
        let mut frames = vec![1, 3, 4, 6, 7, 8];
        let mut n = 6;
        merge_unwound(&[1, 2, 3, 4], &mut frames, &mut n);
        assert_eq!(&frames[..n], &[1, 2, 3, 4, 6, 7, 8]);
        // An unwind that found nothing more leaves the walk.
        let mut frames = vec![1, 2, 3];
        let mut n = 3;
        merge_unwound(&[1], &mut frames, &mut n);
        assert_eq!(frames, vec![1, 2, 3]);
    }

    #[test]
    fn reads_the_kernels_fault_counts_from_stat() {
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 1234 99 7 3 5 6 0 0 20 0 1";
        let k = parse_stat_faults(stat).expect("parsed");
        assert_eq!((k.minor, k.major), (1234, 7));
        assert_eq!(
            k.since(KernelFaults {
                minor: 1000,
                major: 9
            }),
            KernelFaults {
                minor: 234,
                major: 0
            }
        );
        assert_eq!(parse_stat_faults("4242 (x) S 1"), None);
    }

    #[test]
    fn side_band_events_apply_in_time_order_with_faults() {
        let mut c = Collector::new(Fake);
        c.sideband = true;
        c.observe(1);
        c.queue_side([
            side_map(20, 1, 0x0200_0000, false, None),
            side(
                30,
                1,
                SideKind::Exec {
                    comm: Arc::from("new"),
                },
            ),
            side_map(31, 1, 0x0040_0000, true, Some("/bin/new")),
            // Unknown processes are /proc's to read when they first fault, not the side-band's.
            side_map(5, 99, 0x0040_0000, true, Some("/bin/other")),
            side(
                6,
                99,
                SideKind::Exec {
                    comm: Arc::from("other"),
                },
            ),
        ]);
        // A fault before the mapping's record: the mapping is not there yet.
        c.on_bytes(&timed_fault(1, 0x0200_0010, 15));
        assert_eq!(c.stats.unclassified, 1);
        // After it, and before the exec: the old image is still in place.
        c.on_bytes(&timed_fault(1, 0x0200_0020, 25));
        assert_eq!(c.stats.unclassified, 1);
        assert_eq!(
            class_of(&c, 1, 0x0200_0000),
            Some(MappingClass::AnonPrivate)
        );
        assert_eq!(c.processes[&1].comm.as_ref(), "app");
        assert!(!c.processes.contains_key(&99));

        // A kernel-mode fault inside execve, after the new image is mapped: classified in the
        // new image, its user stack resolved against the image that called execve.
        c.on_bytes(&kernel_mode_fault(1, 0x0040_0010, 32, 0x0040_0050));
        let p = &c.processes[&1];
        assert_eq!(p.comm.as_ref(), "new");
        assert_eq!(
            class_of(&c, 1, 0x0200_0000),
            None,
            "exec dropped the old mappings"
        );
        let (key, site) = p
            .earlier
            .iter()
            .find(|(k, _)| k.user.is_some())
            .expect("exec fault");
        assert_eq!(site.total.count, 1);
        assert_eq!(key.path.as_deref(), Some("/bin/new"));
        assert_eq!(
            key.user.map(|u| c.user_stacks.get(u).frames),
            Some(vec![crate::stacks::UserFrame::File {
                path: Arc::from("/bin/app"),
                offset: 0x50
            }])
        );
        // The exec tracepoint ends exec's window: later faults are the new image's own.
        c.on_record(proc_rec_at(PROC_EXEC, 1, 1, 33));
        c.on_bytes(&kernel_mode_fault(1, 0x0040_0020, 34, 0x0040_0060));
        assert_eq!(c.processes[&1].callsites.len(), 1);

        // System-wide, a process first seen at its exec starts there, with no /proc read.
        c.follow_all = true;
        c.queue_side([side(
            40,
            7,
            SideKind::Exec {
                comm: Arc::from("late"),
            },
        )]);
        c.settle(40);
        let late = &c.processes[&7];
        assert_eq!((late.comm.as_ref(), late.space.len()), ("late", 0));
    }

    #[test]
    fn an_exited_process_keeps_its_model() {
        // Records are read after the fact: a short-lived process may be gone when its file
        // mmap record arrives, and the re-read of its maps then finds nothing.
        let mut c = Collector::new(Exited);
        c.processes.insert(
            1,
            ProcessInfo::new(
                Arc::from("app"),
                AddressSpace::from_maps(
                    "01000000-01100000 rw-p 00000000 00:00 0 [heap]\n\
                     7f0000000000-7f0000200000 r-xp 00000000 08:01 7 /lib/libc.so.6\n",
                ),
            ),
        );
        c.on_record(file_mmap(1, 0x7000_0000, 0));
        c.on_record(fault(1, 0x0100_0010, 0));
        c.on_record(fault(1, 0x7f00_0000_1000, 0));
        c.on_record(fault(1, 0x7000_1000, 0));
        assert_eq!(c.stats.unclassified, 0);
        let classes: HashSet<MappingClass> =
            c.processes[&1].callsites.keys().map(|k| k.class).collect();
        assert_eq!(
            classes,
            HashSet::from_iter([MappingClass::Heap, MappingClass::FilePrivate])
        );
    }

    #[test]
    fn classifies_faults_through_mmap_fork_and_exit() {
        let mut c = Collector::new(Fake);
        c.on_record(fault(1, 0x0100_0010, 0));
        c.on_record(file_mmap(1, 0x7000_0000, 0x2000));
        c.on_record(fault(1, 0x7000_1000, FAULT_MAJOR));
        c.on_record(proc_rec(PROC_FORK, 1, 2));
        // The child inherits the parent's mappings even though /proc has nothing for it.
        c.on_record(fault(2, 0x7000_2000, 0));
        c.on_record(proc_rec(PROC_EXIT, 2, 2));
        c.on_record(fault(1, 0x9999_0000, 0));

        let live = &c.processes[&1];
        let major: Vec<_> = live
            .callsites
            .keys()
            .filter(|k| k.kind == FaultKind::Major)
            .map(|k| (k.class, k.path.as_deref().map(str::to_string)))
            .collect();
        assert_eq!(
            major,
            vec![(MappingClass::FilePrivate, Some("/data/file".into()))]
        );
        assert_eq!(live.faults.counts.minor, 2);
        // The child exited: a compact row with its name and resolved callsites.
        assert!(!c.processes.contains_key(&2));
        let child = &c.exited[0];
        assert_eq!((child.pid, &*child.comm, child.processes), (2, "app", 1));
        let sites: Vec<_> = child
            .callsites
            .iter()
            .map(|(k, v)| {
                (
                    k.class,
                    k.path.as_deref().map(str::to_string),
                    v.total.count,
                )
            })
            .collect();
        assert_eq!(
            sites,
            vec![(MappingClass::FilePrivate, Some("/data/file".into()), 1)]
        );
        assert_eq!(c.stats.unclassified, 1);
        assert!(c.spawned.is_empty(), "the child exited");
    }

    #[test]
    fn reused_stacks_resolve_to_the_last_walk() {
        let mut c = Collector::new(Fake);
        let t = stack_token(0, 9, 1);
        c.on_bytes(&walked(1, 0x0100_0000, t, &[0x400100, 0x400200]));
        c.on_record(reused(1, 0x0100_1000, t));
        c.on_record(reused(1, 0x0100_2000, t));
        // A token whose walk was never seen (its record dropped) has no stack.
        c.on_record(reused(1, 0x0100_3000, stack_token(1, 9, 1)));
        let sites = &c.processes[&1].callsites;
        let with_stack: u64 = sites
            .iter()
            .filter(|(k, _)| k.user_stack == Some(0))
            .map(|(_, v)| v.total.count)
            .sum();
        assert_eq!(with_stack, 3);
        assert_eq!(c.stats.stack_unresolved, 1);
        assert_eq!(
            c.processes[&1].stacks.get(0),
            Some(&[0x400100u64, 0x400200][..])
        );
    }

    /// This test process's own maps: real ELF files with real CFI.
    struct Own;
    impl ProcSource for Own {
        fn maps(&self, pid: u32) -> Option<AddressSpace> {
            (pid == std::process::id())
                .then(|| AddressSpace::read(pid).ok())
                .flatten()
        }
        fn comm(&self, _pid: u32) -> Option<String> {
            Some("self".into())
        }
        fn fd_path(&self, _pid: u32, _fd: i32) -> Option<Arc<str>> {
            None
        }
    }

    #[inline(never)]
    fn frameless_at_entry() {}

    #[test]
    fn a_frameless_functions_caller_is_recovered_before_interning() {
        // A fault at a function's first instruction (CFA = rsp + 8): the walk went from it to
        // the caller's caller; the word at rsp is the caller. The walk's faults and the ones
        // that reuse it share the recovered stack.
        let pid = std::process::id();
        let entry = frameless_at_entry as *const () as u64;
        let caller =
            a_frameless_functions_caller_is_recovered_before_interning as *const () as u64 + 5;
        let grandparent = reused_stacks_resolve_to_the_last_walk as *const () as u64 + 5;
        let heap = Box::new(0u64);
        let address = &*heap as *const u64 as u64;
        let mut c = Collector::new(Own);
        let t = stack_token(0, 3, 1);
        let rec = FaultRecord {
            flags: FAULT_HAS_ENTRY | FAULT_STACK_WALKED | FAULT_SP_WORDS,
            stack_token: t,
            sp_words: [caller, 0],
            ..fault_rec(pid, address, 0)
        };
        c.on_bytes(&walked_rec(rec, &[entry, grandparent]));
        c.on_record(reused(pid, address, t));
        // Without the words (a kernel-mode fault, an unreadable stack): unchanged.
        let plain = FaultRecord {
            flags: FAULT_HAS_ENTRY | FAULT_STACK_WALKED,
            ..rec
        };
        c.on_bytes(&walked_rec(plain, &[entry, grandparent]));
        let info = &c.processes[&pid];
        assert_eq!(info.stacks.get(0), Some(&[entry, caller, grandparent][..]));
        assert_eq!(info.stacks.get(1), Some(&[entry, grandparent][..]));
        let count = |i| {
            info.callsites
                .iter()
                .filter(|(k, _)| k.user_stack == Some(i))
                .map(|(_, v)| v.total.count)
                .sum::<u64>()
        };
        assert_eq!((count(0), count(1)), (2, 1));
        assert_eq!(c.unwind.recovered, 1);
    }

    #[test]
    fn exec_resolves_stacks_against_the_old_image() {
        let mut c = Collector::new(Fake);
        c.on_bytes(&walked(1, 0x0100_0000, 0, &[0x400100]));
        c.on_record(Record::Proc(ProcRecord {
            kind: RecordKind::Proc as u32,
            op: PROC_EXEC,
            pid: 1,
            child_pid: 1,
            comm: *b"newimage\0\0\0\0\0\0\0\0",
            time_ns: 0,
        }));
        let info = &c.processes[&1];
        assert!(info.callsites.is_empty() && info.stacks.is_empty());
        assert_eq!(&*info.comm, "newimage");
        let (key, _) = info.earlier.iter().next().expect("a resolved callsite");
        let frames = &c.user_stacks.get(key.user.expect("stack")).frames;
        assert_eq!(
            frames,
            &vec![crate::stacks::UserFrame::File {
                path: Arc::from("/bin/app"),
                offset: 0x100
            }]
        );
    }

    #[test]
    fn exited_processes_fold_by_name_past_the_row_limit() {
        let mut c = Collector::new(Fake);
        let n = 50;
        for i in 0..n {
            let pid = 1000 + i;
            c.on_record(proc_rec(PROC_FORK, 1, pid));
            c.on_bytes(&walked(pid, 0x0100_0000, 0, &[0x400100, 0x400200]));
            c.on_record(proc_rec(PROC_EXIT, pid, pid));
        }
        assert!(c.processes.len() == 1, "only the parent is live");
        assert_eq!(c.exited.len(), EXITED_ROWS_PER_NAME);
        let folded = &c.folded[&Arc::from("app")];
        let rest = u64::from(n) - EXITED_ROWS_PER_NAME as u64;
        assert_eq!((folded.pid, folded.processes), (0, rest));
        assert_eq!(folded.faults.counts.minor, rest);
        // One callsite for all of them: their stacks resolve to the same frames.
        assert_eq!(folded.callsites.len(), 1);
        let total: u64 = c.exited.iter().map(|e| e.faults.counts.minor).sum();
        assert_eq!(total + folded.faults.counts.minor, u64::from(n));
    }

    #[test]
    fn a_process_gone_before_first_sight_is_swept() {
        let mut c = Collector::new(Fake);
        c.on_record(fault(99, 0x1000, 0));
        assert!(c.processes[&99].exited, "/proc had nothing");
        c.sweep_now();
        assert!(c.processes.is_empty());
        assert_eq!(&*c.exited[0].comm, "[unknown]");
    }

    #[test]
    fn faults_at_entry_count_by_the_threads_own_counters() {
        let mut c = Collector::new(Fake);
        let heap = 0x0100_0000;
        // Thread 1: three faults, each accounted as minor (its counter grows by one each).
        // The last waits for the next record, or the final flush.
        // Thread 2: a fault the kernel failed (counters unchanged at the next one), then
        // one that was major (a completion), then one with two faults the kernel took for
        // it in between (get_user_pages).
        let records = [
            entry(1, heap, 100, 10, 0),
            entry(2, heap + 0x1000, 110, 5, 0),
            entry(1, heap + 0x2000, 200, 11, 0),
            entry(2, heap + 0x3000, 210, 5, 0),
            completion(2, heap + 0x3000, 5_210, true),
            entry(1, heap + 0x4000, 300, 12, 0),
            entry(2, heap + 0x5000, 6_000, 5, 1),
            entry(2, heap + 0x6000, 7_000, 8, 1),
        ];
        c.on_record(Record::FaultBatch(&batch(&records)));
        let p = &c.processes[&1].faults;
        // Before the flush: thread 1's first two, thread 2's major and its third fault.
        assert_eq!((p.counts.minor, p.counts.major), (3, 1));
        assert_eq!(p.without_exception.minor, 2);
        assert_eq!(c.stats.faults_unaccounted, 1);
        assert_eq!(p.latency[1].summary().count, 1);
        // The histogram keeps 2 significant figures.
        assert!((4_950..=5_050).contains(&p.latency[1].summary().max));
        c.flush_pending(None, false);
        let p = &c.processes[&1].faults;
        assert_eq!((p.counts.minor, p.counts.major), (5, 1));
        assert_eq!(p.threads[&1].minor, 3);
        assert_eq!((p.threads[&2].minor, p.threads[&2].major), (2, 1));
        // Only the major fault was measured: minor latencies come with their completions.
        assert_eq!(p.latency[0].summary().count, 0);
        // Counted at the flush: the next record's growth starts after it.
        c.on_record(Record::FaultBatch(&batch(&[entry(1, heap, 400, 13, 0)])));
        assert_eq!(c.processes[&1].faults.without_exception.minor, 2);
        assert_eq!(c.stats.faults_unaccounted, 1);
    }

    #[test]
    fn a_completion_before_its_entry_waits_for_it() {
        // A major fault that slept and finished on another CPU: that CPU's batch went out
        // first.
        let mut c = Collector::new(Fake);
        let heap = 0x0100_0000;
        c.on_record(Record::FaultBatch(&batch(&[completion(
            3, heap, 9_000, true,
        )])));
        c.on_record(Record::FaultBatch(&batch(&[
            entry(3, heap, 1_000, 0, 0),
            entry(3, heap + 0x1000, 10_000, 0, 1),
        ])));
        let p = &c.processes[&1].faults;
        assert_eq!(p.counts.major, 1);
        assert!((7_950..=8_050).contains(&p.latency[1].summary().max));
        assert_eq!(c.stats.done_without_entry, 0);
    }

    #[test]
    fn a_reused_tid_does_not_read_as_negative_growth() {
        let mut c = Collector::new(Fake);
        let heap = 0x0100_0000;
        c.on_record(Record::FaultBatch(&batch(&[
            entry(4, heap, 100, 900, 0),
            // Another thread with the same tid: its counters start again.
            entry(4, heap + 0x1000, 200, 2, 0),
        ])));
        let p = &c.processes[&1].faults;
        assert_eq!(p.counts.minor, 1);
        assert_eq!(p.without_exception.minor, 0);
        assert_eq!(c.stats.faults_unaccounted, 0);
    }
}
