//! Address-space changes: mmap, munmap, mremap and brk, recorded at syscall exit on success so
//! the agent's per-process model of VMAs stays current between reads of `/proc/PID/maps`.
//! For `memtrace vma`, the calls that add memory also carry the caller's user stack.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_task, bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{map, tracepoint},
    maps::{Array, PerCpuArray},
    programs::TracePointContext,
    EbpfContext as _,
};
use memtrace_common::{
    counter, layout, PendingSyscall, RecordKind, VmaRecord, VmaWithStack, MAX_STACK_DEPTH,
    OFFSET_UNKNOWN, PT_REGS_CANDIDATES, PT_REGS_ORIG_AX, PT_REGS_SP, SP_WORDS, VMA_BRK, VMA_MMAP,
    VMA_MREMAP, VMA_MUNMAP, VMA_SP_WORDS, VMA_STACK_WALKED,
};

use crate::maps::{
    bump, config, current_ids, is_target, tp_field, wakeup_flags, EVENTS, PENDING_SYSCALLS,
};

/// Per-CPU room to build a VMA record with its user frames.
#[map]
static VMA_SCRATCH: PerCpuArray<VmaWithStack> = PerCpuArray::with_max_entries(1, 0);

/// The index in `PT_REGS_CANDIDATES` found to hold the user registers on this kernel, plus
/// one (0: not found yet).
#[map]
static PT_REGS_FOUND: Array<u32> = Array::with_max_entries(1, 0);

/// x86_64 syscall numbers, to recognize the syscall's own registers.
const NR_MMAP: u64 = 9;
const NR_MUNMAP: u64 = 11;
const NR_BRK: u64 = 12;
const NR_MREMAP: u64 = 25;

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
    // munmap takes memory away: its bytes go to the mapping's own callsite, no stack needed.
    if op != VMA_MUNMAP && config().vma_stacks != 0 {
        emit_with_stack(ctx, rec);
        return 0;
    }
    if EVENTS.output::<VmaRecord>(&rec, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
    0
}

/// The user stack pointer of the current syscall, from the registers saved at syscall entry
/// on top of the task's kernel stack: the candidate place whose `orig_ax` is `nr`.
#[inline(always)]
fn user_sp(nr: u64) -> Option<u64> {
    let off = config().task_stack_off;
    if off == OFFSET_UNKNOWN {
        return None;
    }
    // SAFETY: no preconditions; the pointer is only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: a checked read of task_struct.stack at its BTF offset.
    let stack: u64 =
        unsafe { bpf_probe_read_kernel(task.wrapping_add(off as usize) as *const u64) }.ok()?;
    let found = PT_REGS_FOUND.get_ptr_mut(0)?;
    // SAFETY: a pointer from a successful array lookup.
    let known = unsafe { *found };
    let try_at = |i: usize| -> Option<u64> {
        let regs = stack.wrapping_add(u64::from(*PT_REGS_CANDIDATES.get(i)?));
        // SAFETY: checked kernel reads; a wrong candidate reads another stack word.
        let orig_ax: u64 =
            unsafe { bpf_probe_read_kernel((regs + u64::from(PT_REGS_ORIG_AX)) as *const u64) }
                .ok()?;
        if orig_ax != nr {
            return None;
        }
        // SAFETY: as above.
        unsafe { bpf_probe_read_kernel((regs + u64::from(PT_REGS_SP)) as *const u64) }.ok()
    };
    if known > 0 {
        return try_at((known - 1) as usize & 3);
    }
    for i in 0..PT_REGS_CANDIDATES.len() {
        if let Some(sp) = try_at(i) {
            // SAFETY: as above; a racing CPU writes the same value.
            unsafe { *found = i as u32 + 1 };
            return Some(sp);
        }
    }
    None
}

/// Sends the record with the calling thread's user stack and the words at its stack pointer.
#[inline(always)]
fn emit_with_stack(ctx: &TracePointContext, mut rec: VmaRecord) {
    let Some(buf) = VMA_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value from a successful lookup, only used by this program run.
    let buf = unsafe { &mut *buf };
    const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
    // SAFETY: the destination is the scratch record's frame array of MAX_STACK_DEPTH frames.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.frames.as_mut_ptr().cast(),
            STACK_BYTES,
            BPF_F_USER_STACK as u64,
        )
    };
    let n_user = if got > 0 { (got as u32 / 8) & 127 } else { 0 };
    if n_user == 0 {
        bump(counter::USER_STACK_LOST);
    } else {
        rec.stack_flags |= VMA_STACK_WALKED;
        let nr = match rec.op {
            VMA_MMAP => NR_MMAP,
            VMA_MUNMAP => NR_MUNMAP,
            VMA_MREMAP => NR_MREMAP,
            _ => NR_BRK,
        };
        if let Some(sp) = user_sp(nr) {
            // SAFETY: a checked read of user memory; failure leaves the flag unset.
            if let Ok(words) = unsafe { bpf_probe_read_user(sp as *const [u64; SP_WORDS]) } {
                rec.sp_words = words;
                rec.stack_flags |= VMA_SP_WORDS;
            }
        }
    }
    rec.n_user = n_user as u16;
    buf.header = rec;
    let len = core::mem::size_of::<VmaRecord>() + 8 * n_user as usize;
    if len > core::mem::size_of_val(buf) {
        return;
    }
    // SAFETY: `len` is at most the scratch record's size (checked above).
    let bytes = unsafe { core::slice::from_raw_parts((buf as *const _) as *const u8, len) };
    if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
}
