//! Address-space changes: mmap, munmap, mremap and brk, recorded at syscall exit on success so
//! the agent's per-process model of VMAs stays current between reads of `/proc/PID/maps`.
//! For `memtrace vma`, the calls that add memory also carry the caller's user stack.
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_task, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use memtrace_common::{
    counter, layout, pt_regs, stack_cache_slot, stack_token, PendingSyscall, RecordKind,
    StackCacheSlot, VmaRecord, VmaWithStack, MAX_STACK_DEPTH, OFFSET_UNKNOWN, PT_REGS_CANDIDATES,
    PT_REGS_WORDS, SP_WORDS, VMA_BRK, VMA_MMAP, VMA_MREMAP, VMA_MUNMAP, VMA_SP_WORDS,
    VMA_STACK_COPY, VMA_STACK_COPY_SMALL, VMA_STACK_REUSED, VMA_STACK_SLOTS, VMA_STACK_WALKED,
};

use crate::config;
use crate::maps::{
    bump, cpu_state, current_ids, flush_faults, is_target, tp_field, wakeup_flags, EVENTS,
    PENDING_SYSCALLS,
};

/// Recently walked stacks of mapping calls on this CPU, by `stack_cache_slot(ip, bp)`.
#[map]
static VMA_STACK_CACHE: PerCpuArray<StackCacheSlot> =
    PerCpuArray::with_max_entries(VMA_STACK_SLOTS, 0);

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

/// A syscall's arguments, stashed by its entry program.
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
    emit(ctx, op, (tgid, tid), pending.args, ret, None);
    0
}

/// Every syscall's exit, for `memtrace vma`: the mapping calls are picked by their number in
/// the saved registers, which also hold their arguments. Cheaper than the syscalls' own
/// tracepoints: no entry program, no record built by the kernel, no map.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit_raw(ctx: RawTracePointContext) -> u32 {
    let regs_ptr = ctx.arg::<u64>(0);
    // SAFETY: a checked read of `orig_ax` in the `struct pt_regs` the tracepoint passes.
    let Ok(nr) =
        (unsafe { bpf_probe_read_kernel((regs_ptr + pt_regs::ORIG_AX_OFFSET) as *const u64) })
    else {
        return 0;
    };
    let Some((op, ids)) = traced_mapping_call(nr) else {
        return 0;
    };
    // SAFETY: a checked read of the whole `struct pt_regs`.
    let Ok(regs) = (unsafe { bpf_probe_read_kernel(regs_ptr as *const [u64; PT_REGS_WORDS]) })
    else {
        bump(counter::SYSCALL_ARGS_UNREAD);
        return 0;
    };
    // A compat (32-bit) task numbers its syscalls otherwise: 9 is not mmap there.
    if regs[pt_regs::CS] != pt_regs::USER_CS_64 {
        return 0;
    }
    let ret = ctx.arg::<i64>(1);
    emit(&ctx, op, ids, args_of(&regs), ret, Some(&regs));
    0
}

/// [`sys_exit_raw`] as a BTF-typed tracepoint, tried first: the verifier knows the first
/// argument is a `struct pt_regs *`, so its fields are plain loads instead of
/// `bpf_probe_read_kernel` calls (two per mapping call, one per other syscall).
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit_btf(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u64 = ctx.arg(0);
    // SAFETY: `regs` is the tracepoint's `struct pt_regs *`; the verifier checks each load
    // against that struct's BTF (constant offsets of whole u64 fields).
    let nr = unsafe { *regs.add(pt_regs::ORIG_AX) };
    let Some((op, ids)) = traced_mapping_call(nr) else {
        return 0;
    };
    let mut r = [0u64; PT_REGS_WORDS];
    // SAFETY: as above, one field at a time.
    unsafe {
        r[pt_regs::CS] = *regs.add(pt_regs::CS);
        if r[pt_regs::CS] != pt_regs::USER_CS_64 {
            return 0;
        }
        r[pt_regs::DI] = *regs.add(pt_regs::DI);
        r[pt_regs::SI] = *regs.add(pt_regs::SI);
        r[pt_regs::DX] = *regs.add(pt_regs::DX);
        r[pt_regs::R10] = *regs.add(pt_regs::R10);
        r[pt_regs::R8] = *regs.add(pt_regs::R8);
        r[pt_regs::R9] = *regs.add(pt_regs::R9);
        r[pt_regs::IP] = *regs.add(pt_regs::IP);
        r[pt_regs::BP] = *regs.add(pt_regs::BP);
        r[pt_regs::SP] = *regs.add(pt_regs::SP);
    }
    let ret: i64 = ctx.arg(1);
    emit(&ctx, op, ids, args_of(&r), ret, Some(&r));
    0
}

/// The mapping call a syscall number is, with the current (tgid, tid), when it is one and the
/// process is traced.
#[inline(always)]
fn traced_mapping_call(nr: u64) -> Option<(u32, (u32, u32))> {
    let op = match nr {
        NR_MMAP => VMA_MMAP,
        NR_MUNMAP => VMA_MUNMAP,
        NR_MREMAP => VMA_MREMAP,
        NR_BRK => VMA_BRK,
        _ => return None,
    };
    let (tgid, tid) = current_ids();
    is_target(tgid).then_some((op, (tgid, tid)))
}

#[inline(always)]
fn syscall_nr(op: u32) -> u64 {
    match op {
        VMA_MMAP => NR_MMAP,
        VMA_MUNMAP => NR_MUNMAP,
        VMA_MREMAP => NR_MREMAP,
        _ => NR_BRK,
    }
}

/// The six syscall arguments in the saved registers.
#[inline(always)]
fn args_of(regs: &[u64; PT_REGS_WORDS]) -> [u64; 6] {
    [
        regs[pt_regs::DI],
        regs[pt_regs::SI],
        regs[pt_regs::DX],
        regs[pt_regs::R10],
        regs[pt_regs::R8],
        regs[pt_regs::R9],
    ]
}

/// Builds and sends the record of a completed call (nothing for a failed one).
#[inline(always)]
fn emit<C: EbpfContext>(
    ctx: &C,
    op: u32,
    (tgid, tid): (u32, u32),
    a: [u64; 6],
    ret: i64,
    regs: Option<&[u64; PT_REGS_WORDS]>,
) {
    // Errors come back as -4095..-1; brk reports failure by returning the old break instead.
    if (-4095..0).contains(&ret) || (op == VMA_MUNMAP && ret != 0) {
        return;
    }
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
    if op != VMA_MUNMAP && config!(vma_stacks) != 0 {
        emit_with_stack(ctx, rec, regs);
        return;
    }
    flush_faults();
    if EVENTS.output::<VmaRecord>(&rec, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
}

/// The current syscall's saved user registers, from the top of the task's kernel stack:
/// the candidate place whose `orig_ax` is the syscall `nr` (remembered once found). For the
/// classic tracepoints, which do not pass them.
#[inline(always)]
fn user_regs(nr: u64) -> Option<[u64; PT_REGS_WORDS]> {
    let off = config!(task_stack_off);
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
    let try_at = |i: usize| -> Option<[u64; PT_REGS_WORDS]> {
        let at = stack.wrapping_add(u64::from(*PT_REGS_CANDIDATES.get(i)?));
        // SAFETY: a checked kernel read; a wrong candidate reads other words of the stack.
        let regs: [u64; PT_REGS_WORDS] =
            unsafe { bpf_probe_read_kernel(at as *const [u64; PT_REGS_WORDS]) }.ok()?;
        // The syscall's number, from a 64-bit user task, with a user stack pointer: a stray
        // kernel stack word equal to the number is not taken for the registers.
        let user = regs[pt_regs::CS] == pt_regs::USER_CS_64 && regs[pt_regs::SP] < 1 << 47;
        (regs[pt_regs::ORIG_AX] == nr && user).then_some(regs)
    };
    if known > 0 {
        return try_at((known - 1) as usize & 3);
    }
    for i in 0..PT_REGS_CANDIDATES.len() {
        if let Some(regs) = try_at(i) {
            // SAFETY: as above; a racing CPU writes the same value.
            unsafe { *found = i as u32 + 1 };
            return Some(regs);
        }
    }
    None
}

/// Sends the record with the calling thread's user stack: reused from this CPU's stack cache
/// when the call repeats a recent one's registers, walked otherwise (with the words at the
/// user stack pointer, for the caller of libc's frameless syscall wrapper).
#[inline(always)]
fn emit_with_stack<C: EbpfContext>(
    ctx: &C,
    mut rec: VmaRecord,
    regs: Option<&[u64; PT_REGS_WORDS]>,
) {
    let regs = match regs {
        Some(r) => Some(*r),
        None => user_regs(syscall_nr(rec.op)),
    };
    // The words at the user stack pointer: `[rsp]` is the return address into the caller of
    // libc's frameless wrapper, which the frame-pointer walk skips. It is part of the cache
    // key too, so two callers from the same stack depth do not share a walk.
    let words = regs.and_then(|r| {
        let sp = r[pt_regs::SP] as *const [u64; SP_WORDS];
        // SAFETY: a checked read of user memory.
        unsafe { bpf_probe_read_user(sp) }.ok()
    });
    // Not `[bp + 8]` as well, though it would tell apart `f(){ g(); g(); }`'s two calls: in
    // code without frame pointers (glibc's malloc) bp is any pointer, the word there changes
    // from call to call, and every call walked again (1.47x on the malloc loop).
    let cached = regs.and_then(|r| {
        let (bp, sp) = (r[pt_regs::BP], r[pt_regs::SP]);
        let ip = r[pt_regs::IP] ^ words.map_or(0, |w| w[0]).rotate_left(17);
        let index = stack_cache_slot(ip, bp) & (VMA_STACK_SLOTS - 1);
        VMA_STACK_CACHE
            .get_ptr_mut(index)
            .map(|slot| (slot, index, ip, bp, sp))
    });
    if let Some((slot, _, ip, bp, sp)) = cached {
        // SAFETY: a per-CPU slot from a successful lookup; programs are not preempted.
        if let Some(token) = unsafe { &mut *slot }.lookup(rec.pid, ip, bp, sp) {
            rec.stack_flags |= VMA_STACK_REUSED;
            rec.stack_token = token;
            flush_faults();
            if EVENTS.output::<VmaRecord>(&rec, wakeup_flags()).is_err() {
                bump(counter::RINGBUF_FULL_OTHER);
            }
            return;
        }
    }
    let Some(buf) = VMA_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU value from a successful lookup, only used by this program run.
    let buf = unsafe { &mut *buf };
    // The stack from sp up, for the agent to unwind by CFI: 4 KiB, or 1 KiB near a stack's
    // top (a read that runs past the mapping fails whole).
    let mut copied = 0usize;
    if let Some(r) = regs {
        let sp = r[pt_regs::SP] as *const u8;
        // SAFETY: checked reads of user memory into the buffer's leading bytes.
        copied = if unsafe { bpf_probe_read_user_buf(sp, &mut buf.data[..VMA_STACK_COPY]) }.is_ok()
        {
            VMA_STACK_COPY
        } else if unsafe { bpf_probe_read_user_buf(sp, &mut buf.data[..VMA_STACK_COPY_SMALL]) }
            .is_ok()
        {
            VMA_STACK_COPY_SMALL
        } else {
            0
        };
        rec.user_sp = r[pt_regs::SP];
        rec.user_bp = r[pt_regs::BP];
    }
    let copied = copied.min(VMA_STACK_COPY);
    const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;
    // SAFETY: the frames go right after the copy: at most VMA_STACK_COPY in, with room for
    // MAX_STACK_DEPTH frames after it.
    let got = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.data.as_mut_ptr().add(copied).cast(),
            STACK_BYTES,
            BPF_F_USER_STACK as u64,
        )
    };
    let n_user = if got > 0 { (got as u32 / 8) & 127 } else { 0 };
    if n_user == 0 {
        bump(counter::USER_STACK_LOST);
    } else {
        rec.stack_flags |= VMA_STACK_WALKED;
        rec.stack_copy = copied as u32;
        if let Some(words) = words {
            rec.sp_words = words;
            rec.stack_flags |= VMA_SP_WORDS;
        }
        if let (Some((slot, index, ip, bp, sp)), Some(state)) = (cached, cpu_state()) {
            state.walks = state.walks.wrapping_add(1);
            // SAFETY: no preconditions.
            let cpu = unsafe { bpf_get_smp_processor_id() };
            rec.stack_token = stack_token(cpu, index, state.walks);
            // SAFETY: no preconditions.
            let random = unsafe { bpf_get_prandom_u32() };
            // SAFETY: as above.
            unsafe { &mut *slot }.fill(rec.pid, ip, bp, sp, rec.stack_token, random);
        }
    }
    rec.n_user = n_user as u16;
    // Without frames the copy is not sent.
    let copied = if n_user == 0 { 0 } else { copied };
    rec.stack_copy = copied as u32;
    buf.header = rec;
    let len = core::mem::size_of::<VmaRecord>() + copied + 8 * n_user as usize;
    if len > core::mem::size_of_val(buf) {
        return;
    }
    // SAFETY: `len` is at most the scratch record's size (checked above).
    let bytes = unsafe { core::slice::from_raw_parts((buf as *const _) as *const u8, len) };
    flush_faults();
    if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
        // Nothing to reuse: the walk never reached the agent.
        if let Some((slot, ..)) = cached {
            // SAFETY: as above.
            unsafe { &mut *slot }.token = 0;
        }
    }
}
