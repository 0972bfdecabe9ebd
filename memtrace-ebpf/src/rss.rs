//! Who grows a process's RSS, and when: `kmem:rss_stat` reports each change of an mm's RSS
//! counters (per-CPU batched, so in steps); with `curr` set the task changing it is the
//! current one, so the change is that thread's doing. `memtrace watch --trace` sums the rises
//! and falls of anonymous RSS per thread.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use memtrace_common::{layout, RssThread, MM_ANONPAGES};

use crate::maps::{current_ids, is_target, tp_field};

/// Each traced process's anonymous RSS at its last update, by tgid.
#[map]
static RSS_LAST: HashMap<u32, i64> = HashMap::with_max_entries(8192, 0);

/// Per thread: its processes' anonymous RSS changes at its updates.
#[map]
static RSS_THREADS: HashMap<u32, RssThread> = HashMap::with_max_entries(16384, 0);

#[tracepoint]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: offsets checked against this kernel's rss_stat format by the agent.
    let (curr, member, size) = unsafe {
        (
            tp_field::<u32, { layout::RSS_CURR.1 }>(&ctx),
            tp_field::<i32, { layout::RSS_MEMBER.1 }>(&ctx),
            tp_field::<i64, { layout::RSS_SIZE.1 }>(&ctx),
        )
    };
    if curr == 0 || member != MM_ANONPAGES {
        return 0;
    }
    // SAFETY: copied out at once.
    let last = unsafe { RSS_LAST.get(tgid) }.copied();
    let _ = RSS_LAST.insert(tgid, size, 0);
    // The first update only sets where the process stands.
    let Some(last) = last else {
        return 0;
    };
    let delta = size - last;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match RSS_THREADS.get_ptr_mut(tid) {
        Some(t) => {
            // SAFETY: a value from a successful lookup; a thread runs on one CPU at a time.
            let t = unsafe { &mut *t };
            if delta > 0 {
                t.grown += delta as u64;
            } else {
                t.shrunk += delta.unsigned_abs();
            }
            t.last_ns = now;
        }
        None => {
            let t = RssThread {
                pid: tgid,
                _pad: 0,
                grown: delta.max(0) as u64,
                shrunk: delta.min(0).unsigned_abs(),
                first_ns: now,
                last_ns: now,
            };
            let _ = RSS_THREADS.insert(tid, t, 0);
        }
    }
    0
}
