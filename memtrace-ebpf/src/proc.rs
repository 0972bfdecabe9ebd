//! Process lifecycle: new processes (to follow a traced command's children), exec (the address
//! space is replaced) and thread-group exit.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use memtrace_common::{counter, layout, ProcRecord, RecordKind, PROC_EXEC, PROC_EXIT, PROC_FORK};

use crate::config;
use crate::maps::{
    bump, current_ids, flush_faults, is_target, targets_changed, tp_field, EVENTS, TARGETS,
};

/// `CLONE_THREAD`: the new task joins its parent's thread group.
const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn emit(op: u32, pid: u32, child_pid: u32) {
    let rec = ProcRecord {
        kind: RecordKind::Proc as u32,
        op,
        pid,
        child_pid,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
    };
    flush_faults();
    if EVENTS.output::<ProcRecord>(&rec, 0).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: offsets checked against this kernel's task_newtask format by the agent.
    let (child, clone_flags) = unsafe {
        (
            tp_field::<i32, { layout::NEWTASK_PID.1 }>(&ctx) as u32,
            tp_field::<u64, { layout::NEWTASK_CLONE_FLAGS.1 }>(&ctx),
        )
    };
    if clone_flags & CLONE_THREAD != 0 {
        return 0;
    }
    // Follow children before they can run: the new task is not yet runnable here.
    if config!(filter_pids) != 0 {
        if TARGETS.insert(child, 1, 0).is_ok() {
            targets_changed();
        } else {
            bump(counter::TARGETS_FULL);
        }
    }
    emit(PROC_FORK, tgid, child);
    0
}

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if is_target(tgid) {
        emit(PROC_EXEC, tgid, tgid);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    // SAFETY: offset checked against this kernel's sched_process_exit format by the agent.
    let group_dead: u8 = unsafe { tp_field::<u8, { layout::EXIT_GROUP_DEAD.1 }>(&ctx) };
    // An exiting thread's faults on this CPU go out before anything of a later moment.
    flush_faults();
    if group_dead != 0 && is_target(tgid) {
        emit(PROC_EXIT, tgid, tgid);
        // The pid may be reused by a process nobody asked to trace.
        if config!(filter_pids) != 0 && TARGETS.remove(tgid).is_ok() {
            targets_changed();
        }
    }
    0
}
