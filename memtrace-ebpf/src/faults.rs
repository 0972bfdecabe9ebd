//! Page faults: entry at `exceptions:page_fault_{user,kernel}`, completion at the kernel's own
//! accounting (`PERF_COUNT_SW_PAGE_FAULTS_{MIN,MAJ}`, fired from `mm_account_fault`), so the counts
//! are the kernel's counts and the latency spans the whole fault.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::bpf_ktime_get_ns,
    macros::{perf_event, raw_tracepoint, tracepoint},
    programs::{
        tracing::StackIdContext, PerfEventContext, RawTracePointContext, TracePointContext,
    },
};
use memtrace_common::{
    counter, layout, stack_cache_slot, FaultEntry, FaultRecord, RecordKind, FAULT_HAS_ENTRY,
    FAULT_KERNEL_MODE, FAULT_MAJOR,
};

use crate::maps::{
    bump, config, cpu_state, current_ids, is_target, tp_field, wakeup_flags, EVENTS,
    PENDING_FAULTS, STACKS, STACK_CACHE,
};

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
    state.entry = FaultEntry {
        tid,
        _pad: 0,
        address,
        error_code,
        // SAFETY: no preconditions.
        entry_ns: unsafe { bpf_ktime_get_ns() },
    };
    0
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
    let entry = &mut state.entry;
    if entry.entry_ns == 0 || entry.tid != tid {
        return 0;
    }
    if PENDING_FAULTS.insert(tid, *entry, 0).is_err() {
        crate::maps::bump(counter::PENDING_FULL);
    }
    entry.entry_ns = 0;
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
    let entry = &mut cpu_state()?.entry;
    if entry.entry_ns != 0 && entry.tid == tid && (entry.address ^ address) < 4096 {
        let taken = *entry;
        entry.entry_ns = 0;
        return Some(taken);
    }
    None
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
    let (latency_ns, error_code) = match entry {
        Some(entry) => {
            flags |= FAULT_HAS_ENTRY;
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            (now.saturating_sub(entry.entry_ns), entry.error_code)
        }
        None => {
            bump(counter::ENTRY_MISSED);
            (0, 0)
        }
    };

    let cfg = config();
    let (user_stack_id, kernel_stack_id) = if cfg.capture_stacks == 0 {
        (-1, -1)
    } else if kernel_mode {
        (
            walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST),
            walk_stack(ctx, 0, counter::KERNEL_STACK_LOST),
        )
    } else {
        (
            user_stack_cached(ctx, tgid, (ip, bp, sp), cfg.stack_cache != 0),
            -1,
        )
    };

    let Some(mut rec) = EVENTS.reserve::<FaultRecord>(0) else {
        bump(counter::RINGBUF_FULL_FAULT);
        return Ok(0);
    };
    rec.write(FaultRecord {
        kind: RecordKind::Fault as u32,
        flags,
        pid: tgid,
        tid,
        address,
        ip,
        error_code,
        latency_ns,
        user_stack_id,
        kernel_stack_id,
    });
    rec.submit(wakeup_flags());
    Ok(0)
}

#[inline(always)]
fn walk_stack(ctx: &PerfEventContext, flags: u64, lost: u32) -> i32 {
    match ctx.get_stackid(&STACKS, flags) {
        Ok(id) => id as i32,
        Err(e) => {
            bump(lost);
            e
        }
    }
}

/// The user stack id, reused from this CPU's stack cache when the fault repeats a recent
/// fault's registers (see `StackCacheSlot` for when it is walked anyway), walked otherwise.
#[inline(always)]
fn user_stack_cached(
    ctx: &PerfEventContext,
    tgid: u32,
    (ip, bp, sp): (u64, u64, u64),
    enabled: bool,
) -> i32 {
    if !enabled {
        return walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    }
    let Some(slot) = STACK_CACHE.get_ptr_mut(stack_cache_slot(ip, bp)) else {
        return walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    };
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    let cache = unsafe { &mut *slot };
    if let Some(id) = cache.lookup(tgid, ip, bp, sp) {
        bump(counter::STACK_CACHE_HITS);
        return id;
    }
    let id = walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    cache.fill(tgid, ip, bp, sp, id);
    id
}
