//! Address-space changes: mmap, munmap, mremap and brk, recorded at syscall exit on success so
//! the agent's per-process model of VMAs stays current between reads of `/proc/PID/maps`.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use memtrace_common::{
    counter, layout, PendingSyscall, RecordKind, VmaRecord, VMA_BRK, VMA_MMAP, VMA_MREMAP,
    VMA_MUNMAP,
};

use crate::maps::{bump, current_ids, is_target, tp_field, EVENTS, PENDING_SYSCALLS};

const A0: usize = layout::SYSCALL_ARG0;

/// Reads the n-th syscall argument from a `sys_enter_*` record.
macro_rules! arg {
    ($ctx:expr, $n:literal) => {
        // SAFETY: `sys_enter_*` records hold their 8-byte arguments from SYSCALL_ARG0; the agent
        // checks each syscall's format, and only arguments the syscall has are read.
        unsafe { tp_field::<u64, { A0 + 8 * $n }>($ctx) }
    };
}

#[inline(always)]
fn stash(op: u32, args: [u64; 6]) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    let pending = PendingSyscall { op, _pad: 0, args };
    if PENDING_SYSCALLS.insert(tid, pending, 0).is_err() {
        bump(counter::SYSCALL_PENDING_FULL);
    }
    0
}

#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let c = &ctx;
    let args = [
        arg!(c, 0),
        arg!(c, 1),
        arg!(c, 2),
        arg!(c, 3),
        arg!(c, 4),
        arg!(c, 5),
    ];
    stash(VMA_MMAP, args)
}

#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    let c = &ctx;
    stash(VMA_MUNMAP, [arg!(c, 0), arg!(c, 1), 0, 0, 0, 0])
}

#[tracepoint]
pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
    let c = &ctx;
    let args = [
        arg!(c, 0),
        arg!(c, 1),
        arg!(c, 2),
        arg!(c, 3),
        arg!(c, 4),
        0,
    ];
    stash(VMA_MREMAP, args)
}

#[tracepoint]
pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
    let c = &ctx;
    stash(VMA_BRK, [arg!(c, 0), 0, 0, 0, 0, 0])
}

#[tracepoint]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    complete(&ctx, VMA_MMAP)
}

#[tracepoint]
pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
    complete(&ctx, VMA_MUNMAP)
}

#[tracepoint]
pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
    complete(&ctx, VMA_MREMAP)
}

#[tracepoint]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    complete(&ctx, VMA_BRK)
}

#[inline(always)]
fn complete(ctx: &TracePointContext, op: u32) -> u32 {
    let (tgid, tid) = current_ids();
    // SAFETY: copied out before removal.
    let Some(pending) = (unsafe { PENDING_SYSCALLS.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_SYSCALLS.remove(tid);
    if pending.op != op {
        return 0;
    }
    // SAFETY: `ret` offset checked against the sys_exit_* formats by the agent.
    let ret: i64 = unsafe { tp_field::<i64, { layout::SYSCALL_RET.1 }>(ctx) };
    // Errors come back as -4095..-1; brk reports failure by returning the old break instead.
    if (-4095..0).contains(&ret) || (op == VMA_MUNMAP && ret != 0) {
        return 0;
    }
    let a = pending.args;
    let mut rec = VmaRecord {
        kind: RecordKind::Vma as u32,
        op,
        pid: tgid,
        tid,
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        ..VmaRecord::default()
    };
    match op {
        VMA_MMAP => {
            rec.addr = ret as u64;
            rec.len = a[1];
            rec.prot = a[2] as u32;
            rec.flags = a[3] as u32;
            rec.fd = a[4] as i32;
            rec.offset = a[5];
        }
        VMA_MUNMAP => {
            rec.addr = a[0];
            rec.len = a[1];
        }
        VMA_MREMAP => {
            rec.addr = a[0];
            rec.len = a[1];
            rec.new_len = a[2];
            rec.flags = a[3] as u32;
            rec.new_addr = ret as u64;
        }
        _ => {
            rec.addr = ret as u64;
            rec.len = a[0];
        }
    }
    if EVENTS.output::<VmaRecord>(&rec, 0).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
    0
}
