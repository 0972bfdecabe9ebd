//! Maps and helpers shared by every program.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext, Global,
};
use memtrace_common::{
    counter, BatchedFault, Config, CpuState, FaultBatch, FaultEntry, FaultWithStacks,
    PendingSyscall, RecordKind, StackCacheSlot, TargetCacheSlot, FAULT_BATCH,
    FAULT_BATCH_MAX_AGE_NS, STACK_CACHE_SLOTS,
};

#[unsafe(no_mangle)]
pub static CONFIG: Global<Config> = Global::new(Config::DEFAULT);

/// Every record for the agent, in the order the kernel produced them. Size set by the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Processes (thread-group ids) to trace when `CONFIG.filter_pids` is set.
#[map]
pub static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(8192, 0);

/// Rewritten after every change to `TARGETS` (by the agent too), invalidating every CPU's
/// `CpuState::target`.
#[map]
pub static TARGETS_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU fault-path state: entry slot, target cache, wakeup count.
#[map]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room to build a fault record with its frames before it is copied to `EVENTS`.
/// Stacks travel inside the records instead of through a stack map, which fills up, loses
/// colliding stacks and cannot be cleared while records still refer to its ids.
#[map]
pub static FAULT_SCRATCH: PerCpuArray<FaultWithStacks> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's batch of fault records not yet in `EVENTS` (see [`FaultBatch`]).
#[map]
pub static FAULT_BATCHES: PerCpuArray<FaultBatch> = PerCpuArray::with_max_entries(1, 0);

/// The time of the first record in each CPU's batch (0: empty), for the agent: it applies
/// exits and side-band mapping changes only up to the oldest record still in a batch.
#[map]
pub static FAULT_BATCH_FIRST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn set_batch_first(time_ns: u64) {
    if let Some(first) = FAULT_BATCH_FIRST.get_ptr_mut(0) {
        // SAFETY: a per-CPU value from a successful lookup; a plain 8-byte store the agent
        // may read at any time (it cannot tear on x86_64).
        unsafe { core::ptr::write_volatile(first, time_ns) };
    }
}

/// Adds a fault record without frames (or a completion) to this CPU's batch.
#[inline(always)]
pub fn push_fault(record: BatchedFault) {
    let Some(batch) = fault_batch() else {
        return;
    };
    let Some(slot) = batch.records.get_mut(batch.count as usize) else {
        return;
    };
    *slot = record;
    commit_fault(batch, record.time_ns);
}

/// This CPU's batch, with room for a record at `records[count]` (a full batch is written out
/// first).
#[inline(always)]
pub fn fault_batch() -> Option<&'static mut FaultBatch> {
    let batch = FAULT_BATCHES.get_ptr_mut(0)?;
    // SAFETY: a per-CPU value from a successful lookup: only this CPU touches it, and BPF
    // programs are not preempted (nor run nested on one CPU, per program). Callers hold one
    // reference at a time.
    let batch = unsafe { &mut *batch };
    if batch.count as usize >= FAULT_BATCH {
        write_batch(batch);
    }
    Some(batch)
}

/// Counts the record just written at `records[count]` (made at `time_ns`), and writes the
/// batch out when it is full or its first record has waited [`FAULT_BATCH_MAX_AGE_NS`].
#[inline(always)]
pub fn commit_fault(batch: &mut FaultBatch, time_ns: u64) {
    let n = batch.count;
    if n == 0 {
        batch.first_ns = time_ns;
        set_batch_first(time_ns);
    }
    batch.count = n + 1;
    if n + 1 >= FAULT_BATCH as u32 || time_ns.wrapping_sub(batch.first_ns) > FAULT_BATCH_MAX_AGE_NS
    {
        write_batch(batch);
    }
}

/// Writes this CPU's waiting fault records to `EVENTS` before another record of this CPU, so
/// the ring keeps the order in which each CPU made them.
#[inline(always)]
pub fn flush_faults() {
    let Some(batch) = FAULT_BATCHES.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `push_fault`.
    let batch = unsafe { &mut *batch };
    if batch.count != 0 {
        write_batch(batch);
    }
}

#[inline(always)]
fn write_batch(batch: &mut FaultBatch) {
    batch.kind = RecordKind::FaultBatch as u32;
    let count = u64::from(batch.count);
    // Only the records it holds: a batch written out at a context switch often holds one.
    let used = (batch.count as usize).min(FAULT_BATCH);
    let len =
        core::mem::offset_of!(FaultBatch, records) + used * core::mem::size_of::<BatchedFault>();
    // SAFETY: `len` is at most the batch's size (`used` <= FAULT_BATCH), and the batch is a
    // live per-CPU map value.
    let bytes =
        unsafe { core::slice::from_raw_parts((batch as *const FaultBatch).cast::<u8>(), len) };
    if EVENTS
        .output::<[u8]>(bytes, wakeup_flags_for(count))
        .is_err()
    {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter::RINGBUF_FULL_FAULT) {
            // SAFETY: as in `bump`.
            unsafe { *slot += count };
        }
    }
    batch.count = 0;
    set_batch_first(0);
}

/// Fault entries of threads that were switched out mid-fault (major faults sleep on I/O and may
/// finish on another CPU), keyed by tid.
#[map]
pub static PENDING_FAULTS: LruHashMap<u32, FaultEntry> = LruHashMap::with_max_entries(16384, 0);

/// Recently walked user stacks on this CPU, direct-mapped by `stack_cache_slot(ip, bp)`.
#[map]
pub static STACK_CACHE: PerCpuArray<StackCacheSlot> =
    PerCpuArray::with_max_entries(STACK_CACHE_SLOTS, 0);

/// Syscall arguments from entry, keyed by tid, until the syscall returns.
#[map]
pub static PENDING_SYSCALLS: LruHashMap<u32, PendingSyscall> =
    LruHashMap::with_max_entries(16384, 0);

/// Loss and efficiency counters (indices in `memtrace_common::counter`).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU lookup, so it is valid and only
        // this CPU touches it while this program runs (no preemption inside BPF programs).
        unsafe { *slot += 1 };
    }
}

/// Records a CPU submits between wakeups of the agent (256 KiB of fault records). A wakeup
/// per record (the default) costs an irq_work and a context switch per page fault, and asking
/// the ring how full it is costs a helper call per record; a per-CPU count is two array reads.
/// The agent also drains on a short timer, so a quiet CPU's last records are not left waiting.
const RECORDS_PER_WAKEUP: u64 = 4096;

/// Submit flags for a ring-buffer record: wake the reader only when a batch is waiting.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    wakeup_flags_for(1)
}

/// [`wakeup_flags`] for a write of `records` records.
#[inline(always)]
pub fn wakeup_flags_for(records: u64) -> u64 {
    let Some(state) = cpu_state() else {
        return 0; // the default: wake the reader
    };
    let count = &mut state.records_since_wakeup;
    *count += records;
    if *count >= RECORDS_PER_WAKEUP {
        *count = 0;
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64
    }
}

/// Reads one field of [`CONFIG`] with a volatile load of that field alone (`CONFIG.load()`
/// loads every field, on every call: 17 loads per use on the per-fault path).
#[macro_export]
macro_rules! config {
    ($field:ident) => {{
        // Inside another `unsafe` block this one is redundant, which is fine.
        #[allow(unused_unsafe)]
        // SAFETY: `config_ptr` points at the initialized `Config` of the global; a volatile
        // read, like `Global::load`, so the value the loader set is read, not the default.
        let value = unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!((*$crate::maps::config_ptr()).$field))
        };
        value
    }};
}

/// The loader-set configuration, for [`config!`].
#[inline(always)]
pub fn config_ptr() -> *const Config {
    // `Global<T>` is a `repr(transparent)` `MaybeUninit<T>`, which has `T`'s layout.
    (&CONFIG as *const Global<Config>).cast::<Config>()
}

/// Is this thread group one we trace?
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    if tgid == config!(exclude_tgid) {
        return false;
    }
    if config!(filter_pids) == 0 {
        return true;
    }
    let (Some(generation), Some(state)) = (TARGETS_GENERATION.get_ptr(0), cpu_state()) else {
        return lookup_target(tgid);
    };
    let cache = &mut state.target;
    // SAFETY: a pointer from a successful lookup; a torn read of the shared generation only
    // causes a cache miss.
    let generation = unsafe { core::ptr::read_volatile(generation) };
    if cache.tgid == tgid && cache.generation == generation {
        return cache.is_target != 0;
    }
    // The generation is read before the map: a change racing with this lookup bumps it after,
    // so the answer cached here is never trusted past that change.
    let answer = lookup_target(tgid);
    *cache = TargetCacheSlot {
        generation,
        tgid,
        is_target: answer as u32,
    };
    answer
}

#[inline(always)]
fn lookup_target(tgid: u32) -> bool {
    // SAFETY: the value is a plain u8 and only its presence is used.
    unsafe { TARGETS.get(tgid).is_some() }
}

/// Records a change to `TARGETS` for every CPU's cache. The new generation is a fresh
/// timestamp rather than an increment: two CPUs bumping at once could both write `g + 1`, and a
/// cache filled between the two would survive the second change. Timestamps differ.
#[inline(always)]
pub fn targets_changed() {
    if let Some(generation) = TARGETS_GENERATION.get_ptr_mut(0) {
        // SAFETY: a valid map value; a plain 8-byte store cannot tear on x86_64.
        unsafe { core::ptr::write_volatile(generation, aya_ebpf::helpers::bpf_ktime_get_ns()) };
    }
}

/// This CPU's fault-path state.
#[inline(always)]
pub fn cpu_state() -> Option<&'static mut CpuState> {
    let state = CPU_STATE.get_ptr_mut(0)?;
    // SAFETY: a per-CPU value from a successful lookup: valid for the program's run, and only
    // this CPU touches it while the program runs (BPF programs are not preempted). Callers do
    // not hold two references at once.
    Some(unsafe { &mut *state })
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a field of the tracepoint record at a constant offset.
///
/// # Safety
/// `OFF + size_of::<T>()` must lie within the tracepoint's record, as checked by the agent
/// against the tracepoint's format file (`memtrace_common::layout`).
#[inline(always)]
pub unsafe fn tp_field<T: Copy, const OFF: usize>(ctx: &TracePointContext) -> T {
    // SAFETY: per the function contract the read is within the record; the verifier checks
    // the constant offset against the context size as well.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(OFF).cast::<T>()) }
}
