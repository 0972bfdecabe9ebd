//! Page faults: entry at `exceptions:page_fault_{user,kernel}`, completion at the kernel's own
//! accounting (`PERF_COUNT_SW_PAGE_FAULTS_{MIN,MAJ}`, fired from `mm_account_fault`), so the counts
//! are the kernel's counts and the latency spans the whole fault.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{perf_event, tracepoint},
    programs::{tracing::StackIdContext, PerfEventContext, TracePointContext},
};
use memtrace_common::{
    counter, layout, FaultEntry, FaultRecord, RecordKind, FAULT_HAS_ENTRY, FAULT_KERNEL_MODE,
    FAULT_MAJOR,
};

use crate::maps::{
    bump, config, current_ids, is_target, tp_field, wakeup_flags, EVENTS, FAULT_ENTRY,
    PENDING_FAULTS, STACKS, STACK_CACHE,
};

/// Highest user-space address on x86_64 (47-bit address space; 5-level paging is rarer).
const USER_ADDR_MAX: u64 = 0x0000_7fff_ffff_ffff;

#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    try_fault_entry(&ctx).unwrap_or(0)
}

#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    try_fault_entry(&ctx).unwrap_or(0)
}

#[inline(always)]
fn try_fault_entry(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return Ok(0);
    }
    // SAFETY: offsets checked against this kernel's format file by the agent.
    let address: u64 = unsafe { tp_field::<u64, { layout::PF_ADDRESS.1 }>(ctx) };
    if address > USER_ADDR_MAX {
        return Ok(0);
    }
    // SAFETY: as above.
    let error_code: u64 = unsafe { tp_field::<u64, { layout::PF_ERROR_CODE.1 }>(ctx) };
    let slot = FAULT_ENTRY.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    unsafe {
        *slot = FaultEntry {
            tid,
            _pad: 0,
            address,
            error_code,
            entry_ns: bpf_ktime_get_ns(),
        };
    }
    Ok(0)
}

/// A thread switched out in the middle of a fault takes its entry along, keyed by tid, so the
/// fault still gets its latency when it completes on another CPU.
#[tracepoint]
pub fn sched_switch(_ctx: TracePointContext) -> u32 {
    let Some(slot) = FAULT_ENTRY.get_ptr_mut(0) else {
        return 0;
    };
    let (_, tid) = current_ids();
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    let entry = unsafe { &mut *slot };
    if entry.entry_ns == 0 || entry.tid != tid {
        return 0;
    }
    if PENDING_FAULTS.insert(&tid, &*entry, 0).is_err() {
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

/// Takes the entry for `tid`: this CPU's slot, else one spilled at a context switch.
#[inline(always)]
fn take_entry(tid: u32, address: u64) -> Option<FaultEntry> {
    if let Some(slot) = FAULT_ENTRY.get_ptr_mut(0) {
        // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
        let entry = unsafe { &mut *slot };
        if entry.entry_ns != 0 && entry.tid == tid && (entry.address ^ address) < 4096 {
            let taken = *entry;
            entry.entry_ns = 0;
            return Some(taken);
        }
    }
    // SAFETY: the value is copied out before the element is removed.
    let spilled = unsafe { PENDING_FAULTS.get(&tid) }.copied();
    if spilled.is_some() {
        let _ = PENDING_FAULTS.remove(&tid);
    }
    spilled
}

#[inline(always)]
fn try_fault_accounted(ctx: &PerfEventContext, kind_flags: u32) -> Result<u32, u32> {
    let (tgid, tid) = current_ids();
    if tgid == 0 || !is_target(tgid) {
        return Ok(0);
    }
    // SAFETY: `ctx.ctx` is the kernel-provided `bpf_perf_event_data`; field reads at constant
    // offsets are checked by the verifier.
    let (address, ip, bp, cs) = unsafe {
        let data = &*ctx.ctx;
        (data.addr, data.regs.rip, data.regs.rbp, data.regs.cs)
    };
    let kernel_mode = cs & 3 == 0;
    let mut flags = kind_flags;
    if kernel_mode {
        flags |= FAULT_KERNEL_MODE;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let (latency_ns, error_code) = match take_entry(tid, address) {
        Some(entry) => {
            flags |= FAULT_HAS_ENTRY;
            (now.saturating_sub(entry.entry_ns), entry.error_code)
        }
        None => {
            bump(counter::ENTRY_MISSED);
            (0, 0)
        }
    };
    bump(counter::FAULTS_SEEN);

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
            user_stack_cached(ctx, tgid, ip, bp, cfg.stack_cache != 0),
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

/// A fault loop repeats the same ip, frame pointer and return address thousands of times; the
/// frame-pointer walk it would repeat is the dominant cost, so reuse the last id on this CPU.
#[inline(always)]
fn user_stack_cached(ctx: &PerfEventContext, tgid: u32, ip: u64, bp: u64, enabled: bool) -> i32 {
    if !enabled {
        return walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    }
    // SAFETY: reads 8 bytes of the faulting thread's user stack; a bad pointer only fails.
    let ret: u64 = unsafe { bpf_probe_read_user((bp + 8) as *const u64) }.unwrap_or(0);
    let Some(slot) = STACK_CACHE.get_ptr_mut(0) else {
        return walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    };
    // SAFETY: per-CPU slot from a successful lookup; BPF programs are not preempted.
    let cache = unsafe { &mut *slot };
    if cache.pid == tgid
        && cache.ip == ip
        && cache.bp == bp
        && cache.ret == ret
        && cache.stack_id >= 0
    {
        bump(counter::STACK_CACHE_HITS);
        return cache.stack_id;
    }
    let id = walk_stack(ctx, BPF_F_USER_STACK as u64, counter::USER_STACK_LOST);
    cache.pid = tgid;
    cache.ip = ip;
    cache.bp = bp;
    cache.ret = ret;
    cache.stack_id = id;
    id
}
