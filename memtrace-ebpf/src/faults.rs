//! Page faults: entry at `exceptions:page_fault_{user,kernel}`, completion at the kernel's own
//! accounting (`PERF_COUNT_SW_PAGE_FAULTS_{MIN,MAJ}`, fired from `mm_account_fault`), so the counts
//! are the kernel's counts and the latency spans the whole fault.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_task_btf, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{btf_tracepoint, map, perf_event, raw_tracepoint, tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, PerfEventContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use memtrace_common::{
    counter, layout, pack_thread_faults, pt_regs, stack_cache_slot, stack_token, BatchedFault,
    FaultEntry, FaultRecord, RecordKind, FAULT_AT_ENTRY, FAULT_COMPLETION, FAULT_ENTRY_SLOTS,
    FAULT_HAS_ENTRY, FAULT_KERNEL_MODE, FAULT_MAJOR, FAULT_SP_WORDS, FAULT_STACK_REUSED,
    FAULT_STACK_WALKED, MAX_STACK_DEPTH, SP_WORDS,
};

use crate::config;
use crate::maps::{
    bump, commit_fault, cpu_state, current_ids, fault_batch, flush_faults, is_target, push_fault,
    tp_field, wakeup_flags, EVENTS, FAULT_SCRATCH, PENDING_FAULTS, STACK_CACHE,
};

/// When the agent's current minor-latency window ends (`CLOCK_MONOTONIC` ns; 0: no windows).
#[map]
pub static LATENCY_WINDOW_END: Array<u64> = Array::with_max_entries(1, 0);

/// Highest user-space address on x86_64 (47-bit address space; 5-level paging is rarer).
const USER_ADDR_MAX: u64 = 0x0000_7fff_ffff_ffff;

// Fault entry. Raw tracepoints are the fast path (the arguments arrive in registers, no trace
// record is built); the classic tracepoints are the fallback where raw ones cannot attach.
// TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code).

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user_raw(ctx: RawTracePointContext) -> u32 {
    fault_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(2))
}

#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel_raw(ctx: RawTracePointContext) -> u32 {
    fault_entry(ctx.arg::<u64>(0), ctx.arg::<u64>(2))
}

#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    fault_entry_from_record(&ctx)
}

#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    fault_entry_from_record(&ctx)
}

#[inline(always)]
fn fault_entry_from_record(ctx: &TracePointContext) -> u32 {
    // SAFETY: offsets checked against this kernel's format file by the agent.
    let (address, error_code) = unsafe {
        (
            tp_field::<u64, { layout::PF_ADDRESS.1 }>(ctx),
            tp_field::<u64, { layout::PF_ERROR_CODE.1 }>(ctx),
        )
    };
    fault_entry(address, error_code)
}

/// Stamps this CPU's entry slot; the accounting program completes it.
#[inline(always)]
fn fault_entry(address: u64, error_code: u64) -> u32 {
    if address > USER_ADDR_MAX {
        return 0;
    }
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let Some(state) = cpu_state() else {
        return 0;
    };
    // Round robin: a fault nested inside another's handling takes the next slot and leaves
    // the outer fault's entry in place.
    let slot = (state.entries_written as usize) & (FAULT_ENTRY_SLOTS - 1);
    state.entries_written = state.entries_written.wrapping_add(1);
    if let Some(entry) = state.entries.get_mut(slot) {
        *entry = FaultEntry {
            tid,
            _pad: 0,
            address,
            error_code,
            // SAFETY: no preconditions.
            entry_ns: unsafe { bpf_ktime_get_ns() },
        };
    }
    0
}

/// The slot of this CPU's newest entry for `tid` that `matches`, if any.
#[inline(always)]
fn newest_entry(
    entries: &[FaultEntry; FAULT_ENTRY_SLOTS],
    tid: u32,
    matches: impl Fn(&FaultEntry) -> bool,
) -> Option<usize> {
    let mut found: Option<usize> = None;
    let mut newest = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if e.entry_ns > newest && e.tid == tid && matches(e) {
            newest = e.entry_ns;
            found = Some(i);
        }
    }
    found
}

/// A thread switched out in the middle of a fault takes its entry along, keyed by tid, so the
/// fault still gets its latency when it completes on another CPU.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(_ctx: RawTracePointContext) -> u32 {
    spill_fault_entry()
}

#[tracepoint]
pub fn sched_switch(_ctx: TracePointContext) -> u32 {
    spill_fault_entry()
}

#[inline(always)]
fn spill_fault_entry() -> u32 {
    let Some(state) = cpu_state() else {
        return 0;
    };
    let (_, tid) = current_ids();
    let Some(slot) = newest_entry(&state.entries, tid, |_| true) else {
        return 0;
    };
    if let Some(entry) = state.entries.get_mut(slot) {
        if PENDING_FAULTS.insert(tid, *entry, 0).is_err() {
            crate::maps::bump(counter::PENDING_FULL);
        }
        entry.entry_ns = 0;
    }
    0
}

#[perf_event]
pub fn fault_minor(ctx: PerfEventContext) -> u32 {
    try_fault_accounted(&ctx, 0).unwrap_or(0)
}

#[perf_event]
pub fn fault_major(ctx: PerfEventContext) -> u32 {
    try_fault_accounted(&ctx, FAULT_MAJOR).unwrap_or(0)
}

/// The entry of the fault `tid` is completing at `address`, if this CPU's slot holds it.
#[inline(always)]
fn take_local_entry(tid: u32, address: u64) -> Option<FaultEntry> {
    let state = cpu_state()?;
    let slot = newest_entry(&state.entries, tid, |e| (e.address ^ address) < 4096)?;
    let entry = state.entries.get_mut(slot)?;
    let taken = *entry;
    entry.entry_ns = 0;
    Some(taken)
}

/// The entry `tid` took along when it was switched out mid-fault.
#[inline(always)]
fn take_spilled_entry(tid: u32) -> Option<FaultEntry> {
    // SAFETY: the value is copied out before the element is removed.
    let spilled = unsafe { PENDING_FAULTS.get(tid) }.copied();
    if spilled.is_some() {
        let _ = PENDING_FAULTS.remove(tid);
    }
    spilled
}

#[inline(always)]
fn try_fault_accounted(ctx: &PerfEventContext, kind_flags: u32) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if tgid == 0 {
        return Ok(0);
    }
    // SAFETY: `ctx.ctx` is the kernel-provided `bpf_perf_event_data`; field reads at constant
    // offsets are checked by the verifier.
    let (address, ip, bp, sp, cs) = unsafe {
        let data = &*ctx.ctx;
        (
            data.addr,
            data.regs.rip,
            data.regs.rbp,
            data.regs.rsp,
            data.regs.cs,
        )
    };
    // An entry stamped for this thread means it passed the target filter at entry.
    let entry = match take_local_entry(tid, address) {
        Some(entry) => Some(entry),
        None if !is_target(tgid) => return Ok(0),
        None => take_spilled_entry(tid),
    };
    let kernel_mode = cs & 3 == 0;
    let mut flags = kind_flags;
    if kernel_mode {
        flags |= FAULT_KERNEL_MODE;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (latency_ns, error_code) = match entry {
        Some(entry) => {
            flags |= FAULT_HAS_ENTRY;
            (now.saturating_sub(entry.entry_ns), entry.error_code as u32)
        }
        None => {
            bump(counter::ENTRY_MISSED);
            (0, 0)
        }
    };

    let header = FaultRecord {
        kind: RecordKind::Fault as u32,
        flags,
        pid: tgid,
        tid,
        address,
        ip,
        time_ns: now,
        latency_ns,
        stack_token: 0,
        error_code,
        n_user: 0,
        n_kernel: 0,
        sp_words: [0; SP_WORDS],
        thread_faults: 0,
    };
    if config!(capture_stacks) == 0 {
        emit_fixed(header);
    } else if kernel_mode {
        // The registers are the kernel's here: no user stack pointer to read at.
        emit_walked(ctx, header, None);
    } else if config!(stack_cache) == 0 {
        emit_walked(ctx, header, Some(sp));
    } else {
        emit_user_cached(ctx, header, bp, sp);
    }
    Ok(0)
}

// Records at entry (the default where the kernel's BTF allows): one program per fault, at the
// exception's tracepoint, sends the whole record (thread, address, access, stack, time). The
// perf software events only mark completions: every major fault, and minor faults at a period
// (their latency is a sample), so most faults pay for one hook instead of two.

#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user_btf(ctx: BtfTracePointContext) -> i32 {
    fault_at_entry(&ctx, false);
    0
}

#[btf_tracepoint(function = "page_fault_kernel")]
pub fn page_fault_kernel_btf(ctx: BtfTracePointContext) -> i32 {
    fault_at_entry(&ctx, true);
    0
}

/// Reads a `T` at byte offset `off` of a BTF-typed kernel pointer.
///
/// # Safety
/// `base` must be a BTF-typed pointer the verifier tracks, and `off` a load-time constant
/// offset of a field of type `T` in its struct (from the kernel's BTF).
#[inline(always)]
unsafe fn btf_field<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: per the contract; the verifier checks the load against the struct's BTF.
    unsafe { core::ptr::read(base.add(off as usize).cast::<T>()) }
}

/// Sends the record of a fault that is beginning. Reads the current task's ids and fault
/// counts and the fault's registers with plain loads (BTF-typed pointers), and writes the
/// record straight into this CPU's batch: on a fault whose stack is cached (or not wanted),
/// two helper calls (the task, the clock) and no ring-buffer call.
#[inline(always)]
fn fault_at_entry(ctx: &BtfTracePointContext, kernel_entry: bool) {
    // TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long error_code).
    let address: u64 = ctx.arg(0);
    if address > USER_ADDR_MAX {
        return;
    }
    // SAFETY: no preconditions; the result is a trusted `struct task_struct *`.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    // SAFETY: load-time constant offsets of `task_struct` fields of these types, from BTF
    // (the agent loads this program only when it found all of them).
    let (tgid, disabled) = unsafe {
        (
            btf_field::<i32>(task, config!(task_tgid_off)) as u32,
            btf_field::<i32>(task, config!(task_pagefault_disabled_off)),
        )
    };
    // With page faults disabled (a probe or a tracer reading user memory, futex's atomic
    // access) the kernel fails the fault at once and never accounts it.
    if disabled != 0 || !is_target(tgid) {
        return;
    }
    // SAFETY: as above.
    let (tid, min_flt, maj_flt) = unsafe {
        (
            btf_field::<i32>(task, config!(task_pid_off)) as u32,
            btf_field::<u64>(task, config!(task_min_flt_off)),
            btf_field::<u64>(task, config!(task_maj_flt_off)),
        )
    };
    let regs: *const u64 = ctx.arg(1);
    let error_code: u64 = ctx.arg(2);
    // SAFETY: `regs` is the tracepoint's `struct pt_regs *`; whole u64 fields at constant
    // offsets, checked by the verifier against the struct's BTF.
    let (ip, bp, sp, cs) = unsafe {
        (
            *regs.add(pt_regs::IP),
            *regs.add(pt_regs::BP),
            *regs.add(pt_regs::SP),
            *regs.add(pt_regs::CS),
        )
    };
    let kernel_mode = kernel_entry || cs & 3 == 0;
    let mut flags = FAULT_AT_ENTRY | FAULT_HAS_ENTRY;
    if kernel_mode {
        flags |= FAULT_KERNEL_MODE;
    }
    // SAFETY: no preconditions.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    let thread_faults = pack_thread_faults(min_flt, maj_flt);
    let mut stack_token = 0;
    if config!(capture_stacks) != 0 {
        let walk_slot = if kernel_mode || config!(stack_cache) == 0 {
            None
        } else {
            match cached_stack(tgid, ip, bp, sp) {
                Ok(token) => {
                    flags |= FAULT_STACK_REUSED;
                    stack_token = token;
                    None
                }
                Err(slot) => slot,
            }
        };
        if stack_token == 0 {
            // Walked: a record with frames, sent at once (after this CPU's batch).
            let header = FaultRecord {
                kind: RecordKind::Fault as u32,
                flags,
                pid: tgid,
                tid,
                address,
                ip,
                time_ns,
                error_code: error_code as u32,
                thread_faults,
                ..FaultRecord::default()
            };
            match walk_slot {
                Some(slot) => walk_and_cache(ctx, header, slot, bp, sp),
                None => {
                    emit_walked(ctx, header, (!kernel_mode).then_some(sp));
                }
            }
            return;
        }
    }
    let Some(batch) = fault_batch() else {
        return;
    };
    let Some(r) = batch.records.get_mut(batch.count as usize) else {
        return;
    };
    // Field by field into the batch: no record built on the stack and copied.
    r.flags = flags;
    r.pid = tgid;
    r.tid = tid;
    r.error_code = error_code as u32;
    r.address = address;
    r.time_ns = time_ns;
    r.stack_token = stack_token;
    r.thread_faults = thread_faults;
    commit_fault(batch, time_ns);
}

/// A thread leaving the CPU takes its records along: they go out before it can run (and
/// fault) on another CPU, so each thread's records reach the agent in the order it made them,
/// which the settling of each fault by the next one's counters relies on.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_flush_raw(_ctx: RawTracePointContext) -> u32 {
    flush_faults();
    0
}

#[perf_event]
pub fn fault_minor_done(ctx: PerfEventContext) -> u32 {
    fault_done(&ctx, 0);
    0
}

#[perf_event]
pub fn fault_major_done(ctx: PerfEventContext) -> u32 {
    fault_done(&ctx, FAULT_MAJOR);
    0
}

/// Marks the completion of a fault whose record was sent at entry, in this CPU's batch (after
/// the entry, when the fault began on this CPU).
#[inline(always)]
fn fault_done(ctx: &PerfEventContext, flags: u32) {
    let (tgid, tid) = current_ids();
    if tgid == 0 || !is_target(tgid) {
        return;
    }
    // SAFETY: `ctx.ctx` is the kernel-provided `bpf_perf_event_data`.
    let address = unsafe { (*ctx.ctx).addr };
    // SAFETY: no preconditions.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    if flags & FAULT_MAJOR == 0 {
        // A minor-fault sample only inside the agent's window, however late it closes it.
        if let Some(end) = LATENCY_WINDOW_END.get(0) {
            if *end != 0 && time_ns > *end {
                return;
            }
        }
    }
    push_fault(BatchedFault {
        flags: FAULT_COMPLETION | flags,
        pid: tgid,
        tid,
        error_code: 0,
        address,
        time_ns,
        stack_token: 0,
        thread_faults: 0,
    });
}

/// Sends a record without frames (records at the kernel's accounting).
#[inline(always)]
fn emit_fixed(header: FaultRecord) {
    match EVENTS.reserve::<FaultRecord>(0) {
        Some(mut rec) => {
            rec.write(header);
            rec.submit(wakeup_flags());
        }
        None => bump(counter::RINGBUF_FULL_FAULT),
    }
}

/// Walks the user stack (and the kernel stack for a kernel-mode fault, `user_sp` `None`) into
/// this CPU's scratch record and sends it with its frames. For a user-mode fault it also reads
/// the words at the user stack pointer `user_sp`: the frame-pointer walk skips the caller of a
/// function that has no frame yet, whose return address is there. Returns whether the record
/// was sent with a user stack.
#[inline(always)]
fn emit_walked<C: EbpfContext>(ctx: &C, mut header: FaultRecord, user_sp: Option<u64>) -> bool {
    let kernel_mode = user_sp.is_none();
    let Some(buf) = FAULT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU value from a successful lookup, only used by this program run.
    let buf = unsafe { &mut *buf };
    const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
    // SAFETY: the destination is the scratch record's frame array, which has room for
    // MAX_STACK_DEPTH frames from index 0.
    let user = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.frames.as_mut_ptr().cast(),
            STACK_BYTES,
            BPF_F_USER_STACK as u64,
        )
    };
    let n_user = if user > 0 { (user as u32 / 8) & 127 } else { 0 };
    if n_user == 0 {
        bump(counter::USER_STACK_LOST);
    }
    let mut n_kernel = 0u32;
    if kernel_mode {
        // Right after the user frames: at most MAX_STACK_DEPTH frames from an index below
        // MAX_STACK_DEPTH fit the 2 * MAX_STACK_DEPTH array.
        let at = n_user as usize & 127;
        // SAFETY: `at` < MAX_STACK_DEPTH, so `at + MAX_STACK_DEPTH` frames fit the array.
        let kernel = unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                buf.frames.as_mut_ptr().add(at).cast(),
                STACK_BYTES,
                0,
            )
        };
        n_kernel = if kernel > 0 {
            (kernel as u32 / 8) & 127
        } else {
            0
        };
        if n_kernel == 0 {
            bump(counter::KERNEL_STACK_LOST);
        }
    }
    // Only with a stack: the words complete a walk (and a cache hit reuses them with it).
    if let Some(sp) = user_sp.filter(|_| n_user > 0) {
        // SAFETY: a checked read of user memory: an unmapped or non-present address fails
        // (page faults are disabled inside it) and leaves the flag unset.
        if let Ok(words) = unsafe { bpf_probe_read_user(sp as *const [u64; SP_WORDS]) } {
            header.sp_words = words;
            header.flags |= FAULT_SP_WORDS;
        }
    }
    header.flags |= FAULT_STACK_WALKED;
    header.n_user = n_user as u16;
    header.n_kernel = n_kernel as u16;
    if header.flags & FAULT_AT_ENTRY != 0 {
        // The fault's latency is measured from here: the walk is the tracer's time, not the
        // fault's.
        // SAFETY: no preconditions.
        header.time_ns = unsafe { bpf_ktime_get_ns() };
    }
    buf.header = header;
    let len = core::mem::size_of::<FaultRecord>() + 8 * (n_user + n_kernel) as usize;
    if len > core::mem::size_of_val(buf) {
        return false;
    }
    // SAFETY: `len` is at most the scratch record's size (checked above).
    let bytes = unsafe { core::slice::from_raw_parts((buf as *const _) as *const u8, len) };
    flush_faults();
    if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL_FAULT);
        return false;
    }
    n_user > 0
}

/// A user-mode fault's record: the stack reused from this CPU's stack cache when the fault
/// repeats a recent fault's registers (see `StackCacheSlot` for when it is walked anyway),
/// walked otherwise.
#[inline(always)]
fn emit_user_cached<C: EbpfContext>(ctx: &C, mut header: FaultRecord, bp: u64, sp: u64) {
    match cached_stack(header.pid, header.ip, bp, sp) {
        Ok(token) => {
            header.flags |= FAULT_STACK_REUSED;
            header.stack_token = token;
            emit_fixed(header);
        }
        Err(Some(slot)) => walk_and_cache(ctx, header, slot, bp, sp),
        Err(None) => {
            emit_walked(ctx, header, Some(sp));
        }
    }
}

/// The token of this CPU's cached walk for a fault at these registers, or
/// the cache slot to fill with a fresh walk (`None`: no slot).
#[inline(always)]
fn cached_stack(pid: u32, ip: u64, bp: u64, sp: u64) -> Result<u64, Option<u32>> {
    let slot_index = stack_cache_slot(ip, bp);
    let Some(slot) = STACK_CACHE.get_ptr_mut(slot_index) else {
        return Err(None);
    };
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    let cache = unsafe { &mut *slot };
    // A hit is not counted here (a counter update per fault): the agent counts the records
    // that carry FAULT_STACK_REUSED.
    cache.lookup(pid, ip, bp, sp).ok_or(Some(slot_index))
}

/// Walks the stack of a user-mode fault, sends its record, and caches the walk in
/// `slot_index` for the faults that repeat its registers.
#[inline(always)]
fn walk_and_cache<C: EbpfContext>(
    ctx: &C,
    mut header: FaultRecord,
    slot_index: u32,
    bp: u64,
    sp: u64,
) {
    let (pid, ip) = (header.pid, header.ip);
    let (Some(slot), Some(state)) = (STACK_CACHE.get_ptr_mut(slot_index), cpu_state()) else {
        emit_walked(ctx, header, Some(sp));
        return;
    };
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    let cache = unsafe { &mut *slot };
    state.walks = state.walks.wrapping_add(1);
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let token = stack_token(cpu, slot_index, state.walks);
    header.stack_token = token;
    // A walk that found nothing, or whose record was dropped, leaves nothing to reuse.
    let sent = emit_walked(ctx, header, Some(sp));
    // SAFETY: no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    cache.fill(pid, ip, bp, sp, if sent { token } else { 0 }, random);
}
