//! Fault reports: a plain data structure built from the aggregates, rendered as a table, one
//! JSON document, or folded stacks for flame graphs.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    addrspace::{AddressSpace, MappingClass},
    collector::{Collector, KernelFaults, ResolvedKey},
    fault::{
        Access, AccessCounts, CallsiteFaults, Cause, Counts, FaultKind, LatencySummary,
        ProcessFaults, SiteStats,
    },
    loader::{FaultRecords, KernelCounters},
    stacks::{StackId, StackTree, UserFrame, UserStack},
    symbolize::{Frame, MergePath, Symbolizer},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Folded,
}

#[derive(Clone, Copy, Debug)]
pub struct ReportOptions {
    pub format: Format,
    pub top: usize,
    pub threads: bool,
    pub hist: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct KindLatency {
    pub minor: LatencySummary,
    pub major: LatencySummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ThreadReport {
    pub tid: u32,
    pub minor: u64,
    pub major: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: MappingClass,
    pub minor: u64,
    pub major: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AccessReport {
    pub access: Access,
    pub cause: Cause,
    pub count: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    /// 0 for a row that folds many exited processes of one name.
    pub pid: u32,
    pub comm: String,
    /// Processes in this row: 1, or how many exited processes of this name were folded.
    pub processes: u64,
    pub minor: u64,
    pub major: u64,
    /// Faults taken in kernel mode on user addresses (copy_from_user and the like).
    pub kernel_mode: u64,
    pub exited: bool,
    /// The kernel's own counts for this live process since it was first traced
    /// (`/proc/PID/stat`), where that moment is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelFaults>,
    pub latency_ns: KindLatency,
    /// Faults the kernel counted for the process's threads with no fault exception of theirs
    /// (get_user_pages on their behalf), from the threads' own counters; not in
    /// `minor`/`major`, which have addresses, stacks and access types.
    #[serde(skip_serializing_if = "KernelFaults::is_zero")]
    pub faulted_in_by_kernel: KernelFaults,
    pub threads: Vec<ThreadReport>,
    pub mappings: Vec<ClassReport>,
    pub access: Vec<AccessReport>,
    /// log2 latency buckets `(low_ns, count)` per kind, for `--hist`.
    #[serde(skip)]
    pub log2_hist: [Vec<(u64, u64)>; 2],
}

#[derive(Clone, Debug, Serialize)]
pub struct MappingReport {
    pub class: MappingClass,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CallsiteReport {
    pub pid: u32,
    pub comm: String,
    pub kind: FaultKind,
    pub count: u64,
    pub mapping: MappingReport,
    pub access: Vec<AccessReport>,
    pub latency_ns: LatencySummary,
    /// User stack, innermost first.
    pub frames: Vec<Frame>,
    /// Kernel stack for faults taken in kernel mode, innermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernel_frames: Vec<Frame>,
    /// The user stack walk left executable memory (code without frame pointers): the frames
    /// stop where it did.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// One cause of lost or degraded data: a stable `id` for scripts and tests, and a
/// description for people.
#[derive(Clone, Debug, Serialize)]
pub struct Loss {
    pub id: &'static str,
    pub count: u64,
    pub description: &'static str,
}

impl Loss {
    pub fn new(id: &'static str, count: u64, description: &'static str) -> Self {
        Self {
            id,
            count,
            description,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LostReport {
    /// Fault records that never reached the agent (counts are low by this much).
    pub events: u64,
    pub causes: Vec<Loss>,
}

/// What a report's figures cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The whole run so far.
    Total,
    /// Only the time since the previous report (`-i`).
    Interval,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// Whether the figures are the run's totals or one interval's.
    pub scope: Scope,
    /// Since tracing started.
    pub duration_s: f64,
    /// The time the figures cover: the interval for an interval report, else `duration_s`.
    pub covers_s: f64,
    pub minor: u64,
    pub major: u64,
    /// Processes seen, in every row (folded rows hold many).
    pub process_count: u64,
    /// Rows in `processes` before `--top` cut the list.
    pub processes_total: usize,
    pub processes: Vec<ProcessReport>,
    /// How fault latency was measured: which faults have a latency in the figures.
    pub latency_sampling: LatencySampling,
    /// Faults recorded at entry that the kernel did not account (it failed them: a bad
    /// address, a fatal signal): not counted anywhere else.
    pub faults_not_accounted: u64,
    /// Callsites before `--top` cut the list.
    pub callsites_total: usize,
    pub callsites: Vec<CallsiteReport>,
    pub lost: LostReport,
    /// User stacks reused from the in-kernel cache instead of walked again.
    pub stack_cache_hits: u64,
    /// Walked user stacks that got the caller of a frameless function back from the words at
    /// the stack pointer (run totals).
    pub leaf_callers_recovered: u64,
    /// Frames of the callsites shown whose file the report had no time left to symbolize
    /// ([`SYMBOLIZE_UNTIL`]): shown as module and file offset (what addr2line takes), and
    /// symbolized for the next report.
    pub unsymbolized_frames: u64,
    /// The kernel's own counts beside memtrace's, where they could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_counts: Option<KernelCountsReport>,
    /// With `kmem:rss_stat` traced (`watch --trace`): each thread's share of its process's
    /// anonymous RSS changes, most grown first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_threads: Vec<RssThreadReport>,
    /// What memtrace itself cost, as of this report.
    pub agent: AgentStats,
}

/// Which faults' latencies the figures hold.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LatencySampling {
    /// `entry`: records are sent as each fault begins, and the kernel's accounting marks the
    /// completions measured; `accounting`: records are sent at the accounting, every fault
    /// with its latency.
    pub records_at: &'static str,
    /// One minor fault in this many has its latency measured, on average (1: every one;
    /// 0: none). The period each CPU's event uses is drawn again every second, so that the
    /// rate is uniform in [0.5, 1.5) times one in this.
    pub minor_period: u32,
    /// One major fault in this many (always 1 when traced).
    pub major_period: u32,
    /// Latencies measured in what the report covers, minor and major.
    pub minor_samples: u64,
    pub major_samples: u64,
    /// When minor faults are measured in windows: a `window_ms` window at a random point of
    /// every `cycle_ms`, at `period_in_window` (the mean rate is still one in `minor_period`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_windows: Option<crate::loader::LatencyWindows>,
}

impl LatencySampling {
    /// For people: what the latency columns are made of, for a report of `minor` faults.
    pub fn describe(&self, minor: u64) -> String {
        let measured = if self.minor_samples > 0 {
            format!(
                ": {} of {minor} measured (1 in {:.0})",
                self.minor_samples,
                minor as f64 / self.minor_samples as f64
            )
        } else {
            format!(": none of {minor} measured")
        };
        let minor = match self.minor_period {
            0 => "minor faults not measured (--counts-only)".to_string(),
            1 => "every minor fault".to_string(),
            n => match self.minor_windows {
                Some(w) => format!(
                    "minor faults sampled at random, 1 in {n} on average, in a {} ms window of \
                     every {} ms{measured}",
                    w.window_ms, w.cycle_ms
                ),
                None => format!("minor faults sampled at random, 1 in {n} on average{measured}"),
            },
        };
        format!("latency: {minor}; every major fault")
    }
}

/// One thread's changes of its process's anonymous RSS (`kmem:rss_stat`, per-CPU batched:
/// they come in steps of up to a few hundred KiB).
#[derive(Clone, Debug, Serialize)]
pub struct RssThreadReport {
    pub pid: u32,
    pub tid: u32,
    pub grown_bytes: u64,
    pub shrunk_bytes: u64,
    /// Its first and last change, in seconds since tracing started.
    pub first_s: f64,
    pub last_s: f64,
}

/// The kernel's fault counts next to memtrace's for the same processes. The kernel also
/// counts faults it takes on a process's behalf through get_user_pages (execve copying the
/// arguments, O_DIRECT I/O into fresh buffers, ptrace, process_vm_readv): those raise no
/// fault event, so memtrace cannot see or attribute them, and they make up the difference.
#[derive(Clone, Debug, Serialize)]
pub struct KernelCountsReport {
    /// Where the kernel's figures come from.
    pub source: &'static str,
    pub processes: u64,
    pub kernel: KernelFaults,
    pub memtrace: KernelFaults,
    /// Faults the threads' own counters show the kernel faulted in for them without a fault
    /// exception (get_user_pages), when faults are recorded at entry: most of the difference.
    pub faulted_in_by_kernel: KernelFaults,
    /// For a command memtrace started: the faults its child took after fork, before memtrace
    /// followed it (the rest of the difference).
    #[serde(skip_serializing_if = "KernelFaults::is_zero")]
    pub before_followed: KernelFaults,
    pub note: &'static str,
}

const KERNEL_COUNTS_NOTE: &str = "the kernel also counts faults it takes on a process's behalf \
     (get_user_pages: execve copying arguments, MAP_POPULATE, mlock, O_DIRECT I/O, ptrace), \
     which raise no fault exception: memtrace cannot attribute those to a callsite";

/// memtrace's own footprint: what an SRE checks before leaving a tracer on a busy host.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct AgentStats {
    /// Peak resident memory (VmHWM) so far.
    pub peak_rss_bytes: u64,
    pub rss_bytes: u64,
    /// CPU time of the agent (user and system), in seconds.
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    /// Ring-buffer records handled.
    pub records: u64,
    /// Agent CPU (user + system) per record handled since tracing started (loading and
    /// verifying the programs excluded), in nanoseconds.
    pub cpu_ns_per_record: f64,
}

/// Agent CPU seconds when tracing started.
static CPU_AT_START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

impl AgentStats {
    /// Marks the start of tracing: `cpu_ns_per_record` counts CPU from here on.
    pub fn tracing_started() {
        let (user, sys) = Self::cpu_seconds();
        let _ = CPU_AT_START.set(user + sys);
    }

    fn cpu_seconds() -> (f64, f64) {
        // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (secs(usage.ru_utime), secs(usage.ru_stime))
    }

    /// Reads this process's own figures from /proc/self/status and getrusage.
    pub fn current(records: u64) -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let (user, sys) = Self::cpu_seconds();
        let tracing_cpu = user + sys - CPU_AT_START.get().copied().unwrap_or(0.0);
        Self {
            peak_rss_bytes: kib("VmHWM:"),
            rss_bytes: kib("VmRSS:"),
            cpu_user_s: user,
            cpu_sys_s: sys,
            records,
            cpu_ns_per_record: if records == 0 {
                0.0
            } else {
                tracing_cpu.max(0.0) * 1e9 / records as f64
            },
        }
    }
}

fn access_list(counts: &AccessCounts) -> Vec<AccessReport> {
    let mut v: Vec<_> = counts
        .iter()
        .map(|(access, cause, count)| AccessReport {
            access,
            cause,
            count,
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.access.cmp(&b.access)));
    v
}

/// Buckets a histogram by powers of two, the way the classic BPF tools draw latency.
pub fn log2_buckets(hist: &hdrhistogram::Histogram<u64>) -> Vec<(u64, u64)> {
    let mut buckets: Vec<u64> = Vec::new();
    for v in hist.iter_recorded() {
        let value = v.value_iterated_to().max(1);
        let idx = 63 - value.leading_zeros() as usize;
        if buckets.len() <= idx {
            buckets.resize(idx + 1, 0);
        }
        buckets[idx] += v.count_at_value();
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, c)| (1u64 << i, c))
        .skip_while(|&(_, c)| c == 0)
        .collect()
}

/// The sources a report is built from.
pub struct ReportInput<'a> {
    pub collector: &'a Collector,
    pub counters: KernelCounters,
    pub elapsed: Duration,
    /// What the report covers (the interval, or the whole run).
    pub covers: Duration,
    /// The kernel's counts for the traced command and the descendants it waited for, once
    /// it has been reaped.
    pub command_faults: Option<KernelFaults>,
    /// How the fault path records, as attached.
    pub fault_records: crate::loader::FaultRecords,
    /// The minor-latency sample's windows, if it has them.
    pub latency_windows: Option<crate::loader::LatencyWindows>,
}

fn process_report(
    pid: u32,
    comm: &str,
    processes: u64,
    exited: bool,
    p: &ProcessFaults,
    kernel: Option<KernelFaults>,
) -> ProcessReport {
    let mut threads: Vec<_> = p
        .threads
        .iter()
        .map(|(&tid, c)| ThreadReport {
            tid,
            minor: c.minor,
            major: c.major,
        })
        .collect();
    threads.sort_by(|a, b| {
        (b.minor + b.major)
            .cmp(&(a.minor + a.major))
            .then(a.tid.cmp(&b.tid))
    });
    let mut mappings: Vec<_> = p
        .by_class
        .iter()
        .map(|(class, c)| ClassReport {
            class,
            minor: c.minor,
            major: c.major,
        })
        .collect();
    mappings.sort_by_key(|m| (std::cmp::Reverse(m.minor + m.major), m.class));
    ProcessReport {
        pid,
        comm: comm.to_string(),
        processes,
        minor: p.counts.minor,
        major: p.counts.major,
        kernel_mode: p.kernel_mode,
        exited,
        kernel,
        faulted_in_by_kernel: KernelFaults {
            minor: p.without_exception.minor,
            major: p.without_exception.major,
        },
        latency_ns: KindLatency {
            minor: p.latency[0].summary(),
            major: p.latency[1].summary(),
        },
        threads,
        mappings,
        access: access_list(&p.access),
        log2_hist: [
            log2_buckets(p.latency[0].hist()),
            log2_buckets(p.latency[1].hist()),
        ],
    }
}

/// A callsite's user stack as the collector keeps it: raw addresses with the address space
/// they resolve in (a live process), or resolved already (before an exec, after an exit).
enum SiteStack<'a> {
    None,
    Live(&'a AddressSpace, &'a [u64]),
    Resolved(&'a crate::stacks::StackTree, StackId),
}

impl SiteStack<'_> {
    /// The stack in position-independent frames, into `out` (reused: a report over 100,000
    /// stacks resolves them one at a time, allocating none); `false` for no stack.
    fn resolve_into(&self, out: &mut UserStack) -> bool {
        match self {
            SiteStack::None => false,
            SiteStack::Live(space, ips) => {
                out.resolve_into(space, ips);
                true
            }
            SiteStack::Resolved(tree, id) => {
                tree.get_into(*id, out);
                true
            }
        }
    }
}

/// The merge paths of a stack tree's nodes for one report, each computed once: stacks in the
/// tree share their outer frames, and 100,000 distinct deep stacks of one program are a few
/// hundred thousand nodes where they are millions of frames.
struct TreePaths<'a> {
    tree: &'a StackTree,
    /// Nodes whose frames were handed to the symbolizer.
    wanted: Vec<bool>,
    /// Each node's merge path (of its frames, outermost first); `u32::MAX` until computed.
    paths: Vec<u32>,
    chain: Vec<(u32, Option<UserFrame>)>,
    ids: Vec<u32>,
}

impl<'a> TreePaths<'a> {
    const UNKNOWN: u32 = u32::MAX;

    fn new(tree: &'a StackTree) -> Self {
        Self {
            tree,
            wanted: vec![false; tree.len()],
            paths: vec![Self::UNKNOWN; tree.len()],
            chain: Vec::new(),
            ids: Vec::new(),
        }
    }

    /// Hands the frames of stack `id` not handed over yet to the symbolizer, weighed by the
    /// callsite's `faults`.
    fn want(&mut self, id: StackId, faults: u64, symbolizer: &mut Symbolizer) {
        let mut node = id.node();
        while let Some(wanted) = self.wanted.get_mut(node as usize).filter(|w| !**w) {
            *wanted = true;
            let Some((parent, frame)) = self.tree.node(node) else {
                break;
            };
            if let Some(UserFrame::File { path, offset }) = frame {
                symbolizer.want_frame(&path, offset, faults);
            }
            node = parent;
        }
    }

    /// The merge path of stack `id`'s frames, outermost first.
    fn path(&mut self, id: StackId, symbolizer: &mut Symbolizer) -> MergePath {
        // Up to the nearest node already known (or the root), then down from there.
        self.chain.clear();
        let mut node = id.node();
        let mut path = MergePath::EMPTY;
        while let Some(&known) = self.paths.get(node as usize) {
            if known != Self::UNKNOWN {
                path = MergePath::from_node(known);
                break;
            }
            let Some((parent, frame)) = self.tree.node(node) else {
                break;
            };
            self.chain.push((node, frame));
            node = parent;
        }
        while let Some((node, frame)) = self.chain.pop() {
            if let Some(frame) = frame {
                self.ids.clear();
                symbolizer.frame_ids(&frame, &mut self.ids);
                // A frame's ids run innermost (inlined) first.
                self.ids.reverse();
                path = symbolizer.merge_extend(path, &self.ids);
            }
            if let Some(p) = self.paths.get_mut(node as usize) {
                *p = path.node();
            }
        }
        path
    }
}

/// One callsite from any source (live, before an exec, exited, folded).
struct SiteRef<'a> {
    pid: u32,
    comm: &'a Arc<str>,
    kind: FaultKind,
    class: MappingClass,
    path: &'a Option<Arc<str>>,
    user: SiteStack<'a>,
    kernel_stack: Option<u32>,
    faults: &'a SiteStats,
}

impl<'a> SiteRef<'a> {
    fn resolved(
        collector: &'a Collector,
        pid: u32,
        comm: &'a Arc<str>,
        k: &'a ResolvedKey,
        f: &'a SiteStats,
    ) -> Self {
        Self {
            pid,
            comm,
            kind: k.kind,
            class: k.class,
            path: &k.path,
            user: k.user.map_or(SiteStack::None, |id| {
                SiteStack::Resolved(&collector.user_stacks, id)
            }),
            kernel_stack: k.kernel_stack,
            faults: f,
        }
    }
}

/// Every callsite the collector holds, with its faults over the run, or with `interval` those
/// since the last interval report (callsites without any are left out).
fn all_callsites(collector: &Collector, interval: bool) -> Vec<SiteRef<'_>> {
    fn stats(f: &CallsiteFaults, interval: bool) -> Option<&SiteStats> {
        if interval {
            f.interval.as_deref()
        } else {
            Some(&f.total)
        }
    }
    let live: usize = collector
        .processes
        .values()
        .map(|p| p.callsites.len() + p.earlier.len())
        .sum();
    let exited: usize = collector
        .exited
        .iter()
        .chain(collector.folded.values())
        .map(|r| r.callsites.len())
        .sum();
    let mut sites = Vec::with_capacity(if interval { 0 } else { live + exited });
    for (&pid, info) in &collector.processes {
        for (k, faults) in &info.callsites {
            let Some(faults) = stats(faults, interval) else {
                continue;
            };
            let user = match k.user_stack.and_then(|i| info.stacks.get(i)) {
                Some(ips) => SiteStack::Live(&info.space, ips),
                None => SiteStack::None,
            };
            sites.push(SiteRef {
                pid,
                comm: &info.comm,
                kind: k.kind,
                class: k.class,
                path: &k.path,
                user,
                kernel_stack: k.kernel_stack,
                faults,
            });
        }
        for (key, faults) in &info.earlier {
            if let Some(faults) = stats(faults, interval) {
                sites.push(SiteRef::resolved(collector, pid, &info.comm, key, faults));
            }
        }
    }
    for row in collector.exited.iter().chain(collector.folded.values()) {
        for (key, faults) in &row.callsites {
            if let Some(faults) = stats(faults, interval) {
                sites.push(SiteRef::resolved(
                    collector, row.pid, &row.comm, key, faults,
                ));
            }
        }
    }
    sites
}

/// Every source of lost or degraded data, in report order.
fn loss_table(c: &KernelCounters, stats: &crate::collector::CollectorStats) -> Vec<Loss> {
    let loss = Loss::new;
    vec![
        loss(
            "ringbuf_full_fault",
            c.ringbuf_full_fault,
            "ring buffer full: fault records dropped (counts are low by this much)",
        ),
        loss(
            "ringbuf_full_other",
            c.ringbuf_full_other,
            "ring buffer full: mmap/process records dropped",
        ),
        loss(
            "user_stack_empty",
            c.user_stack_lost,
            "user stack walk found no frame",
        ),
        loss(
            "kernel_stack_empty",
            c.kernel_stack_lost,
            "kernel stack walk found no frame",
        ),
        loss(
            "stack_unresolved",
            stats.stack_unresolved,
            "fault reused a stack walk whose record was dropped",
        ),
        loss(
            "stack_table_full",
            stats.stack_table_full + stats.kernel_stack_table_full,
            "stack table full: stack not kept",
        ),
        loss(
            "sideband_lost",
            stats.sideband_lost,
            "perf side-band records dropped: mappings may be unknown",
        ),
        loss(
            "callsite_table_full",
            stats.callsite_table_full,
            "callsite table full: faults counted without their stack",
        ),
        loss(
            "entry_missed",
            c.entry_missed,
            "fault entry not seen: no latency or access type",
        ),
        loss(
            "completion_without_entry",
            stats.done_without_entry,
            "fault completion whose entry record was missing: no latency",
        ),
        loss(
            "pending_fault_map_full",
            c.pending_full,
            "pending-fault map full at context switch: no latency",
        ),
        loss(
            "syscall_map_full",
            c.syscall_pending_full,
            "pending-syscall map full: mapping change missed",
        ),
        loss(
            "target_map_full",
            c.targets_full,
            "target map full: child processes not followed",
        ),
        loss("undecodable", stats.undecodable, "undecodable records"),
        loss(
            "unclassified",
            stats.unclassified,
            "fault address outside every known mapping",
        ),
    ]
}

/// Which row of the report a process's totals are: a process of its own, or the row that
/// folds exited processes of one name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum RowKey {
    Pid(u32),
    Folded(Arc<str>),
}

/// Callsites merge on what a user asks ("which function", not "which instruction"): the row
/// (pid; for folded rows, pid 0, the row's own name), kind, mapping (class and path, as an id
/// within the report) and the frames' merge ids. Small and `Copy`, so merging is a sort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MergeKey {
    pid: u32,
    /// The folded row's name, by address (each folded row holds one); 0 for other rows.
    folded_row: usize,
    kind: FaultKind,
    class: MappingClass,
    path: u32,
    frames: MergePath,
}

/// A row's key, pid (0 when folded), name, processes it holds, whether they exited, totals.
type Row<'a> = (RowKey, u32, &'a Arc<str>, u64, bool, &'a ProcessFaults);

/// The totals as of the previous interval report, so the next one shows what changed since.
#[derive(Debug, Default)]
pub struct IntervalBaseline {
    /// Each row's name, processes and totals.
    processes: HashMap<RowKey, (Arc<str>, u64, ProcessFaults)>,
    losses: Vec<u64>,
    stack_cache_hits: u64,
}

impl IntervalBaseline {
    /// Rows of the baseline that are gone now (their processes exited and folded into the
    /// row of their name) count toward that folded row, so its interval figures hold only
    /// what came since.
    fn fold_vanished(&mut self, current: &HashSet<RowKey>) {
        let vanished: Vec<(u32, Arc<str>, ProcessFaults)> = self
            .processes
            .extract_if(|k, _| matches!(k, RowKey::Pid(_)) && !current.contains(k))
            .filter_map(|(k, (comm, _, faults))| match k {
                RowKey::Pid(pid) => Some((pid, comm, faults)),
                RowKey::Folded(_) => None,
            })
            .collect();
        for (_, comm, faults) in vanished {
            let folded = self
                .processes
                .entry(RowKey::Folded(comm.clone()))
                .or_insert_with(|| (comm.clone(), 0, ProcessFaults::default()));
            // Its faults were counted before; as a process it joins the folded row now, so
            // it counts among the processes of this interval.
            folded.2.merge(&faults);
        }
    }
}

/// How long after an interval report starts its symbolizing stops: a host that ran hundreds
/// of big programs since the last report must not stall the ring for seconds, and on a loaded
/// host the wall time, not the agent's CPU time, is what the ring waits for. Files are taken
/// by the faults behind them, the first always; those left are symbolized ahead for the next
/// report.
pub const SYMBOLIZE_UNTIL: Duration = Duration::from_millis(500);
/// [`SYMBOLIZE_UNTIL`] for the final report: nothing waits in the ring any more, and what is
/// left now stays unsymbolized, but a stop signal must still end memtrace within 2 s.
pub const SYMBOLIZE_UNTIL_FINAL: Duration = Duration::from_millis(1500);

/// Builds a report from what the collector holds. With `since` (interval reports), each
/// figure is what came since the previous report; call [`Collector::end_interval`] after.
pub fn build(
    input: &ReportInput<'_>,
    symbolizer: &mut Symbolizer,
    opts: &ReportOptions,
    mut since: Option<&mut IntervalBaseline>,
) -> FaultReport {
    let started = Instant::now();
    let collector = input.collector;
    let scope = if since.is_some() {
        Scope::Interval
    } else {
        Scope::Total
    };
    // Every row's totals, live processes first (a reused pid's exited row comes after).
    let rows: Vec<Row<'_>> = collector
        .processes
        .iter()
        .map(|(&pid, p)| (RowKey::Pid(pid), pid, &p.comm, 1, p.exited, &p.faults))
        .chain(collector.exited.iter().map(|e| {
            (
                RowKey::Pid(e.pid),
                e.pid,
                &e.comm,
                e.processes,
                true,
                &e.faults,
            )
        }))
        .chain(collector.folded.values().map(|e| {
            (
                RowKey::Folded(e.comm.clone()),
                0,
                &e.comm,
                e.processes,
                true,
                &e.faults,
            )
        }))
        .collect();
    if let Some(baseline) = since.as_deref_mut() {
        let current: HashSet<RowKey> = rows.iter().map(|r| r.0.clone()).collect();
        baseline.fold_vanished(&current);
    }
    let mut seen_rows: HashSet<&RowKey> = HashSet::new();
    let mut processes: Vec<ProcessReport> = Vec::with_capacity(rows.len());
    for (key, pid, comm, count, exited, faults) in &rows {
        let report = match since.as_deref() {
            // The interval's own figures: each baseline row is taken away once.
            Some(baseline) => {
                let earlier = baseline
                    .processes
                    .get(key)
                    .filter(|_| seen_rows.insert(key));
                let (delta, count) = match earlier {
                    // A folded row holds the processes folded into it meanwhile.
                    Some((_, n, e)) => (faults.since(e), count.saturating_sub(*n)),
                    None => ((*faults).clone(), *count),
                };
                // A process that exited and faulted not at all meanwhile has nothing to say.
                if *exited && delta.counts.total() == 0 {
                    continue;
                }
                process_report(*pid, comm, count, *exited, &delta, None)
            }
            None => {
                let kernel = if *exited {
                    None
                } else {
                    collector.kernel_faults(*pid)
                };
                process_report(*pid, comm, *count, *exited, faults, kernel)
            }
        };
        processes.push(report);
    }
    let mut total = Counts::default();
    // Latencies measured in what this report covers, minor and major.
    let mut measured = [0u64; 2];
    for p in &processes {
        total.minor += p.minor;
        total.major += p.major;
        measured[0] += p.latency_ns.minor.count;
        measured[1] += p.latency_ns.major.count;
    }
    // Before --top cuts the rows: every process counts. Interval reports leave the
    // kernel's counts out: they are totals since each process was first traced.
    let kernel_counts = if since.is_some() {
        None
    } else {
        kernel_counts(input, &processes, total)
    };
    let process_count = processes.iter().map(|p| p.processes).sum();
    processes.sort_by(|a, b| {
        (b.minor + b.major)
            .cmp(&(a.minor + a.major))
            .then(a.pid.cmp(&b.pid))
            .then(a.comm.cmp(&b.comm))
    });
    let processes_total = processes.len();
    processes.truncate(opts.top);

    // Symbolize every stack, then merge callsites whose stacks name the same functions: an
    // unrolled loop faults from several instructions of one function, and a user asks "which
    // function", not "which instruction". Merging works on small frame ids; frames are built
    // only for the callsites the report shows, so a run with 100,000 callsites does not hold
    // 100,000 symbolized stacks at once.
    // Before the first interval report, a callsite's interval is its total.
    let sites = all_callsites(collector, since.is_some() && collector.intervals);
    symbolizer.begin_report();
    let mut stack = UserStack::default();
    let mut tree_paths = TreePaths::new(&collector.user_stacks);
    for site in &sites {
        match &site.user {
            SiteStack::None => {}
            SiteStack::Live(space, ips) => {
                stack.resolve_into(space, ips);
                symbolizer.want_user(&stack, site.faults.count);
            }
            SiteStack::Resolved(_, id) => tree_paths.want(*id, site.faults.count, symbolizer),
        }
        if let Some(ips) = site
            .kernel_stack
            .and_then(|i| collector.kernel_stacks.get(i))
        {
            symbolizer.want_kernel(ips);
        }
    }
    let until = if since.is_some() {
        SYMBOLIZE_UNTIL
    } else {
        SYMBOLIZE_UNTIL_FINAL
    };
    symbolizer.symbolize_wanted(Some(started + until));
    // Each site's merge key, sorted: a merged callsite is a run of equal keys. Its faults
    // are summed only if the report shows it.
    let mut paths: HashMap<&str, u32> = HashMap::new();
    let mut keyed: Vec<(MergeKey, u32)> = Vec::with_capacity(sites.len());
    let mut ids = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        // User frames outermost first (the order a stack tree shares them in), then the
        // kernel's after a separator.
        let user = match &site.user {
            SiteStack::None => MergePath::EMPTY,
            SiteStack::Live(space, ips) => {
                stack.resolve_into(space, ips);
                ids.clear();
                symbolizer.user_ids(&stack, &mut ids);
                ids.reverse();
                symbolizer.merge_extend(MergePath::EMPTY, &ids)
            }
            SiteStack::Resolved(_, id) => tree_paths.path(*id, symbolizer),
        };
        ids.clear();
        ids.push(u32::MAX); // user and kernel frames apart
        if let Some(ips) = site
            .kernel_stack
            .and_then(|i| collector.kernel_stacks.get(i))
        {
            symbolizer.kernel_ids(ips, &mut ids);
        }
        let path = site.path.as_deref().map_or(0, |p| {
            let next = paths.len() as u32 + 1;
            *paths.entry(p).or_insert(next)
        });
        let key = MergeKey {
            pid: site.pid,
            folded_row: if site.pid == 0 {
                Arc::as_ptr(site.comm).cast::<u8>() as usize
            } else {
                0
            },
            kind: site.kind,
            class: site.class,
            path,
            frames: symbolizer.merge_extend(user, &ids),
        };
        keyed.push((key, i as u32));
    }
    drop(paths);
    drop(tree_paths);
    keyed.sort_unstable();
    // Per merged callsite: its sites in `keyed`, and their total count.
    let mut merged: Vec<(std::ops::Range<usize>, u64)> = Vec::new();
    for (i, (key, site)) in keyed.iter().enumerate() {
        let count = sites[*site as usize].faults.count;
        match merged.last_mut() {
            Some((range, total)) if keyed[range.start].0 == *key => {
                range.end = i + 1;
                *total += count;
            }
            _ => merged.push((i..i + 1, count)),
        }
    }
    let c = input.counters;
    let mut losses = loss_table(&c, &collector.stats);
    let mut lost_events = c.ringbuf_full_fault;
    let mut stack_cache_hits = collector.stats.stack_reused;
    if let Some(baseline) = since {
        let totals: Vec<u64> = losses.iter().map(|l| l.count).collect();
        for (loss, earlier) in losses.iter_mut().zip(&baseline.losses) {
            loss.count = loss.count.saturating_sub(*earlier);
        }
        lost_events = losses
            .iter()
            .find(|l| l.id == "ringbuf_full_fault")
            .map_or(0, |l| l.count);
        stack_cache_hits = stack_cache_hits.saturating_sub(baseline.stack_cache_hits);
        baseline.losses = totals;
        baseline.stack_cache_hits = collector.stats.stack_reused;
        baseline.processes = rows
            .iter()
            .map(|(key, _, comm, n, _, faults)| {
                (key.clone(), ((*comm).clone(), *n, (*faults).clone()))
            })
            .collect();
    }
    // Most faults first; among equals, by pid and kind (then by key, for a stable order).
    let first_site = |range: &std::ops::Range<usize>| &sites[keyed[range.start].1 as usize];
    merged.sort_unstable_by(|(ra, a), (rb, b)| {
        b.cmp(a)
            .then(first_site(ra).pid.cmp(&first_site(rb).pid))
            .then(first_site(ra).kind.cmp(&first_site(rb).kind))
            .then(keyed[ra.start].0.cmp(&keyed[rb.start].0))
    });
    let callsites_total = merged.len();
    // Folded output feeds flame graphs: every callsite. Tables and JSON honour --top.
    if opts.format != Format::Folded {
        merged.truncate(opts.top);
    }
    let callsites: Vec<CallsiteReport> = merged
        .iter()
        .map(|(range, _)| {
            let site = first_site(range);
            // A merged callsite's faults: its only site's, or the sum of its sites'.
            let summed;
            let faults = if range.len() == 1 {
                site.faults
            } else {
                let mut sum = SiteStats::default();
                for (_, i) in &keyed[range.clone()] {
                    sum.merge(sites[*i as usize].faults);
                }
                summed = sum;
                &summed
            };
            let has_user = site.user.resolve_into(&mut stack);
            let frames = if has_user {
                symbolizer.user_frames(&stack)
            } else {
                Vec::new()
            };
            let kernel_frames = site
                .kernel_stack
                .and_then(|i| collector.kernel_stacks.get(i))
                .map(|ips| symbolizer.kernel_stack(ips))
                .unwrap_or_default();
            CallsiteReport {
                pid: site.pid,
                comm: site.comm.to_string(),
                kind: site.kind,
                count: faults.count,
                mapping: MappingReport {
                    class: site.class,
                    path: site.path.as_deref().map(str::to_string),
                },
                access: access_list(&faults.access_counts()),
                latency_ns: faults.latency.summary(),
                frames,
                kernel_frames,
                truncated: has_user && stack.truncated,
            }
        })
        .collect();
    drop(sites);
    symbolizer.finish();

    let stats = &collector.stats;
    let latency_sampling = match input.fault_records {
        FaultRecords::AtEntry { latency_period } => LatencySampling {
            records_at: "entry",
            minor_period: latency_period,
            major_period: 1,
            minor_samples: measured[0],
            major_samples: measured[1],
            minor_windows: input.latency_windows,
        },
        FaultRecords::AtAccounting | FaultRecords::None => LatencySampling {
            records_at: "accounting",
            minor_period: 1,
            major_period: 1,
            minor_samples: total.minor,
            major_samples: total.major,
            minor_windows: None,
        },
    };
    FaultReport {
        scope,
        duration_s: input.elapsed.as_secs_f64(),
        covers_s: input.covers.as_secs_f64(),
        minor: total.minor,
        major: total.major,
        process_count,
        processes_total,
        processes,
        latency_sampling,
        faults_not_accounted: stats.faults_unaccounted,
        callsites_total,
        callsites,
        lost: LostReport {
            events: lost_events,
            causes: losses,
        },
        stack_cache_hits,
        leaf_callers_recovered: collector.unwind.recovered,
        unsymbolized_frames: symbolizer.shown_unsymbolized(),
        kernel_counts,
        rss_threads: Vec::new(),
        // Last, so the peak includes this report's own symbolization.
        agent: AgentStats::current(collector.stats.records),
    }
}

/// The kernel's counts beside memtrace's: for the whole command once it was reaped, else
/// for the live processes whose counts at the start of tracing are known.
fn kernel_counts(
    input: &ReportInput<'_>,
    processes: &[ProcessReport],
    total: Counts,
) -> Option<KernelCountsReport> {
    if let Some(kernel) = input.command_faults {
        return Some(KernelCountsReport {
            source: "wait4 rusage of the command and the descendants it waited for",
            processes: processes.iter().map(|p| p.processes).sum(),
            kernel,
            memtrace: KernelFaults {
                minor: total.minor,
                major: total.major,
            },
            faulted_in_by_kernel: sum_faulted_in(processes.iter()),
            before_followed: input.collector.before_followed,
            note: KERNEL_COUNTS_NOTE,
        });
    }
    let mut counted = processes.iter().filter(|p| p.kernel.is_some()).peekable();
    counted.peek()?;
    let mut report = KernelCountsReport {
        source: "/proc/PID/stat of live processes, since each was first traced",
        processes: 0,
        kernel: KernelFaults::default(),
        memtrace: KernelFaults::default(),
        faulted_in_by_kernel: KernelFaults::default(),
        before_followed: KernelFaults::default(),
        note: KERNEL_COUNTS_NOTE,
    };
    for p in counted {
        let k = p.kernel.unwrap_or_default();
        report.processes += 1;
        report.kernel.minor += k.minor;
        report.kernel.major += k.major;
        report.memtrace.minor += p.minor;
        report.memtrace.major += p.major;
        report.faulted_in_by_kernel.minor += p.faulted_in_by_kernel.minor;
        report.faulted_in_by_kernel.major += p.faulted_in_by_kernel.major;
    }
    Some(report)
}

fn sum_faulted_in<'a>(processes: impl Iterator<Item = &'a ProcessReport>) -> KernelFaults {
    let mut sum = KernelFaults::default();
    for p in processes {
        sum.minor += p.faulted_in_by_kernel.minor;
        sum.major += p.faulted_in_by_kernel.major;
    }
    sum
}

fn ns(v: u64) -> String {
    match v {
        0..=9_999 => format!("{v}ns"),
        10_000..=9_999_999 => format!("{:.1}us", v as f64 / 1e3),
        _ => format!("{:.1}ms", v as f64 / 1e6),
    }
}

fn draw_hist(out: &mut String, title: &str, buckets: &[(u64, u64)]) {
    if buckets.is_empty() {
        return;
    }
    let max = buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1);
    let _ = writeln!(
        out,
        "    {title}\n    {:>26} : {:<10} distribution",
        "nsecs", "count"
    );
    for &(low, count) in buckets {
        let stars = (count * 40).div_ceil(max) as usize;
        let _ = writeln!(
            out,
            "    {:>12} -> {:<11} : {:<10} |{:<40}|",
            low,
            low * 2 - 1,
            count,
            "*".repeat(stars.min(40))
        );
    }
}

pub fn render_table(r: &FaultReport, opts: &ReportOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "memtrace faults: {}, {} minor, {} major in {} process(es){}; lost {} fault records",
        match r.scope {
            Scope::Total => format!("{:.1}s", r.duration_s),
            Scope::Interval => format!(
                "the {:.1}s interval to {:.1}s alone",
                r.covers_s, r.duration_s
            ),
        },
        r.minor,
        r.major,
        r.process_count,
        if r.processes_total > r.processes.len().min(opts.top) {
            format!(
                " (top {} of {} rows shown)",
                r.processes.len().min(opts.top),
                r.processes_total
            )
        } else {
            String::new()
        },
        r.lost.events
    );
    let _ = writeln!(out, "{}", r.latency_sampling.describe(r.minor));
    let _ = writeln!(
        out,
        "\n{:>8} {:<16} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}  TOP MAPPINGS",
        "PID", "COMM", "MINOR", "MAJOR", "MIN p50", "MIN p99", "MAJ p50", "MAJ p99"
    );
    for p in r.processes.iter().take(opts.top) {
        let maps: Vec<String> = p
            .mappings
            .iter()
            .take(3)
            .map(|m| format!("{} {}", m.class, m.minor + m.major))
            .collect();
        let l = &p.latency_ns;
        let lat = |s: &LatencySummary, v: u64| if s.count == 0 { "-".into() } else { ns(v) };
        let pid = if p.pid == 0 {
            "-".to_string()
        } else {
            p.pid.to_string()
        };
        let folded = format!("  ({} exited processes of this name, folded)", p.processes);
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}  {}{}",
            pid,
            p.comm,
            p.minor,
            p.major,
            lat(&l.minor, l.minor.p50),
            lat(&l.minor, l.minor.p99),
            lat(&l.major, l.major.p50),
            lat(&l.major, l.major.p99),
            maps.join(", "),
            match (p.pid, p.exited) {
                (0, _) => folded.as_str(),
                (_, true) => "  (exited)",
                _ => "",
            }
        );
        if opts.threads {
            for t in &p.threads {
                let _ = writeln!(
                    out,
                    "{:>8} {:<16} {:>10} {:>8}",
                    t.tid, "  thread", t.minor, t.major
                );
            }
        }
        if opts.hist {
            draw_hist(
                &mut out,
                &format!("pid {} minor fault latency", p.pid),
                &p.log2_hist[0],
            );
            draw_hist(
                &mut out,
                &format!("pid {} major fault latency", p.pid),
                &p.log2_hist[1],
            );
        }
    }
    if !r.callsites.is_empty() {
        let _ = writeln!(out, "\nTop callsites:");
    }
    for c in &r.callsites {
        let access = c
            .access
            .first()
            .map(|a| format!("{:?}/{:?}", a.access, a.cause).to_lowercase())
            .unwrap_or_default();
        let path = c
            .mapping
            .path
            .as_deref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        let who = if c.pid == 0 {
            format!("exited {} processes", c.comm)
        } else {
            format!("pid {} ({})", c.pid, c.comm)
        };
        let _ = writeln!(
            out,
            "{:>10} {} {}{} {} p50 {} {}",
            c.count,
            c.kind.as_str(),
            c.mapping.class,
            path,
            access,
            if c.latency_ns.count == 0 {
                "-".to_string()
            } else {
                ns(c.latency_ns.p50)
            },
            who
        );
        // Innermost first: a kernel-mode fault's kernel frames sit below the syscall's user frames.
        for f in c.kernel_frames.iter().take(6) {
            let _ = writeln!(out, "{:>12}[k] {}", "", f.display());
        }
        for f in c.frames.iter().take(8) {
            let _ = writeln!(out, "{:>12}{}", "", f.display());
        }
        if c.truncated && c.frames.len() <= 8 {
            let _ = writeln!(out, "{:>12}[stack cut: return address outside code]", "");
        }
    }
    if let Some(k) = &r.kernel_counts {
        let by_kernel = if k.faulted_in_by_kernel.is_zero() {
            String::new()
        } else {
            format!(
                ", and the threads' own counters show {} minor, {} major faulted in by the \
                 kernel without a fault of theirs",
                k.faulted_in_by_kernel.minor, k.faulted_in_by_kernel.major
            )
        };
        let by_kernel = if k.before_followed.is_zero() {
            by_kernel
        } else {
            format!(
                "{by_kernel}; {} minor, {} major came before memtrace followed the command (its \
                 child between fork and exec)",
                k.before_followed.minor, k.before_followed.major
            )
        };
        let _ = writeln!(
            out,
            "\nKernel's own count ({}, {} process(es)): {} minor, {} major; memtrace saw {} minor, \
             {} major{by_kernel}. The difference: {}.",
            k.source,
            k.processes,
            k.kernel.minor,
            k.kernel.major,
            k.memtrace.minor,
            k.memtrace.major,
            k.note
        );
    }
    if r.faults_not_accounted > 0 {
        let _ = writeln!(
            out,
            "\n{} fault(s) began but the kernel did not account them (a bad address, a fatal \
             signal): not counted.",
            r.faults_not_accounted
        );
    }
    let lost: Vec<String> = r
        .lost
        .causes
        .iter()
        .filter(|l| l.count > 0)
        .map(|l| format!("{}: {}", l.description, l.count))
        .collect();
    let _ = writeln!(
        out,
        "\nmemtrace itself: peak RSS {} MiB, CPU {:.2}s user + {:.2}s sys for {} records ({:.0} ns each)",
        r.agent.peak_rss_bytes >> 20,
        r.agent.cpu_user_s,
        r.agent.cpu_sys_s,
        r.agent.records,
        r.agent.cpu_ns_per_record
    );
    if r.unsymbolized_frames > 0 {
        let _ = writeln!(
            out,
            "\n{} frames shown as module+offset: the report ran out of time to symbolize their \
             files (they are symbolized for the next report).",
            r.unsymbolized_frames
        );
    }
    let _ = writeln!(
        out,
        "\nLost: {}",
        if lost.is_empty() {
            "nothing".to_string()
        } else {
            lost.join("; ")
        }
    );
    out
}

/// Folded stacks (`comm;outer;...;inner;[class] count`), the input of flamegraph.pl/inferno.
pub fn render_folded(r: &FaultReport) -> String {
    let mut out = String::new();
    for c in &r.callsites {
        let mut parts = vec![c.comm.replace(';', "_")];
        parts.extend(c.frames.iter().rev().map(|f| f.function.replace(';', "_")));
        parts.extend(
            c.kernel_frames
                .iter()
                .rev()
                .map(|f| format!("{}_[k]", f.function)),
        );
        parts.push(format!("[{} {}]", c.kind.as_str(), c.mapping.class));
        let _ = writeln!(out, "{} {}", parts.join(";"), c.count);
    }
    out
}

pub fn render(r: &FaultReport, opts: &ReportOptions) -> String {
    match opts.format {
        Format::Table => render_table(r, opts),
        Format::Json => {
            serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                + "\n"
        }
        Format::Folded => render_folded(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::ExitedProcess;

    #[test]
    fn log2_buckets_group_by_power_of_two() {
        let mut h = hdrhistogram::Histogram::<u64>::new(2).expect("hist");
        for v in [1000u64, 1500, 1800, 3000, 70_000] {
            h.record(v).expect("record");
        }
        let b = log2_buckets(&h);
        assert_eq!(b.first(), Some(&(512, 1)));
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 5);
        assert!(b.contains(&(1024, 2)));
        assert!(b.contains(&(2048, 1)));
        assert!(b.contains(&(65536, 1)));
    }

    #[test]
    fn table_json_and_folded_render_a_report() {
        let mut collector = Collector::default();
        let fault = crate::fault::Fault {
            pid: 42,
            tid: 43,
            kind: FaultKind::Major,
            kernel_mode: false,
            address: 0x1000,
            latency_ns: Some(25_000),
            access: Access::Read,
            cause: Cause::NotPresent,
            user_stack: None,
            kernel_stack: None,
            class: MappingClass::FilePrivate,
            path: Some("/data/x".into()),
        };
        let info = collector.observe(4_000_000_042);
        info.faults.record(&fault);
        info.callsites
            .entry(crate::fault::CallsiteKey::of(&fault))
            .or_default()
            .record(&fault, false);
        let input = ReportInput {
            fault_records: crate::loader::FaultRecords::AtAccounting,
            latency_windows: None,
            collector: &collector,
            counters: KernelCounters {
                ringbuf_full_fault: 3,
                ..Default::default()
            },
            command_faults: None,
            elapsed: Duration::from_secs(2),
            covers: Duration::from_secs(2),
        };
        let opts = ReportOptions {
            format: Format::Table,
            top: 10,
            threads: true,
            hist: true,
        };
        let r = build(&input, &mut Symbolizer::new(), &opts, None);
        assert_eq!((r.minor, r.major, r.lost.events), (0, 1, 3));
        let table = render_table(&r, &opts);
        assert!(table.contains("lost 3 fault records"), "{table}");
        assert!(table.contains("file_private /data/x"), "{table}");
        assert!(table.contains("|****"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&render(
            &r,
            &ReportOptions {
                format: Format::Json,
                ..opts
            },
        ))
        .expect("json");
        assert_eq!(json["processes"][0]["major"], 1);
        assert_eq!(json["processes"][0]["latency_ns"]["major"]["count"], 1);
        assert_eq!(json["callsites"][0]["mapping"]["class"], "file_private");
        assert_eq!(json["lost"]["causes"][0]["id"], "ringbuf_full_fault");
        assert_eq!(json["lost"]["causes"][0]["count"], 3);
        assert_eq!(render_folded(&r), ";[major file_private] 1\n");
    }

    fn minor_fault(pid: u32, latency_ns: u64) -> crate::fault::Fault {
        crate::fault::Fault {
            pid,
            tid: pid,
            kind: FaultKind::Minor,
            kernel_mode: false,
            address: 0x1000,
            latency_ns: Some(latency_ns),
            access: Access::Write,
            cause: Cause::NotPresent,
            user_stack: None,
            kernel_stack: None,
            class: MappingClass::Heap,
            path: None,
        }
    }

    fn record(collector: &mut Collector, pid: u32, n: u64, latency_ns: u64) {
        let intervals = collector.intervals;
        let info = collector.observe(pid);
        info.comm = "worker".into();
        for _ in 0..n {
            let f = minor_fault(pid, latency_ns);
            info.faults.record(&f);
            info.callsites
                .entry(crate::fault::CallsiteKey::of(&f))
                .or_default()
                .record(&f, intervals);
        }
    }

    fn report_of(
        collector: &mut Collector,
        counters: KernelCounters,
        since: Option<&mut IntervalBaseline>,
    ) -> FaultReport {
        let interval = since.is_some();
        let input = ReportInput {
            fault_records: crate::loader::FaultRecords::AtAccounting,
            latency_windows: None,
            collector,
            counters,
            command_faults: None,
            elapsed: Duration::from_secs(3),
            covers: Duration::from_secs(1),
        };
        let opts = ReportOptions {
            format: Format::Json,
            top: 10,
            threads: true,
            hist: false,
        };
        let report = build(&input, &mut Symbolizer::new(), &opts, since);
        if interval {
            collector.end_interval();
        }
        report
    }

    #[test]
    fn callsites_whose_stacks_mean_the_same_merge_and_others_stay_apart() {
        let mut collector = Collector::default();
        let pid = 4_000_000_042;
        let info = collector.observe(pid);
        info.comm = "worker".into();
        // Two raw stacks outside every mapping: both resolve to one unmapped frame, so
        // they are one callsite; a third fault hits another mapping class.
        let mut budget = 100;
        let a = info.stacks.intern(&[0x1000], &mut budget);
        let b = info.stacks.intern(&[0x2000], &mut budget);
        assert_ne!(a, b);
        for (stack, n, ns, class) in [
            (a, 3, 1_000, MappingClass::Heap),
            (b, 4, 9_000, MappingClass::Heap),
            (a, 2, 5_000, MappingClass::AnonPrivate),
        ] {
            for _ in 0..n {
                let f = crate::fault::Fault {
                    user_stack: stack,
                    class,
                    ..minor_fault(pid, ns)
                };
                info.faults.record(&f);
                info.callsites
                    .entry(crate::fault::CallsiteKey::of(&f))
                    .or_default()
                    .record(&f, false);
            }
        }
        let r = report_of(&mut collector, KernelCounters::default(), None);
        assert_eq!(r.callsites_total, 2);
        let heap = &r.callsites[0];
        assert_eq!((heap.count, heap.latency_ns.count), (7, 7));
        assert_eq!(heap.mapping.class, MappingClass::Heap);
        assert!((8_000..=10_000).contains(&heap.latency_ns.max), "{heap:?}");
        assert_eq!(r.callsites[1].count, 2);
        assert_eq!(r.callsites[1].mapping.class, MappingClass::AnonPrivate);
    }

    #[test]
    fn interval_reports_show_what_changed_and_the_final_one_the_totals() {
        let mut collector = Collector::default();
        let mut baseline = IntervalBaseline::default();
        let lost = |n| KernelCounters {
            ringbuf_full_fault: n,
            ..Default::default()
        };
        record(&mut collector, 4_000_000_042, 100, 2_000);
        let first = report_of(&mut collector, lost(5), Some(&mut baseline));
        assert_eq!(first.scope, Scope::Interval);
        assert_eq!((first.minor, first.lost.events), (100, 5));
        // Slower faults in the second interval: its percentiles are its own.
        record(&mut collector, 4_000_000_042, 30, 90_000);
        let second = report_of(&mut collector, lost(7), Some(&mut baseline));
        assert_eq!((second.minor, second.lost.events), (30, 2));
        assert_eq!(second.processes[0].minor, 30);
        assert_eq!(second.processes[0].threads[0].minor, 30);
        let p50 = second.processes[0].latency_ns.minor.p50;
        assert!((85_000..=95_000).contains(&p50), "interval p50 {p50}");
        assert_eq!(second.callsites[0].count, 30);
        let site_p50 = second.callsites[0].latency_ns.p50;
        assert!((84_000..=96_000).contains(&site_p50), "{site_p50}");
        // Nothing new: an interval with no faults.
        let idle = report_of(&mut collector, lost(7), Some(&mut baseline));
        assert_eq!(
            (idle.minor, idle.callsites.len(), idle.lost.events),
            (0, 0, 0)
        );
        let total = report_of(&mut collector, lost(7), None);
        assert_eq!(total.scope, Scope::Total);
        assert_eq!((total.minor, total.lost.events), (130, 7));
        assert_eq!(total.callsites[0].count, 130);
    }

    #[test]
    fn a_process_folded_away_between_intervals_is_not_counted_again() {
        let mut collector = Collector::default();
        let mut baseline = IntervalBaseline::default();
        record(&mut collector, 4_000_000_042, 100, 2_000);
        let first = report_of(
            &mut collector,
            KernelCounters::default(),
            Some(&mut baseline),
        );
        assert_eq!(first.minor, 100);
        // It faults 10 more times, exits, and folds into the row of its name, with its
        // callsites resolved.
        record(&mut collector, 4_000_000_042, 10, 2_000);
        let info = collector.processes.remove(&4_000_000_042).expect("live");
        let mut row = ExitedProcess {
            pid: 0,
            comm: info.comm.clone(),
            processes: 1,
            ..Default::default()
        };
        row.faults.merge(&info.faults);
        for (k, f) in &info.callsites {
            let key = ResolvedKey {
                kind: k.kind,
                class: k.class,
                path: k.path.clone(),
                user: None,
                kernel_stack: None,
            };
            row.callsites.entry(key).or_default().merge(f);
        }
        collector.folded.insert(info.comm.clone(), row);
        let second = report_of(
            &mut collector,
            KernelCounters::default(),
            Some(&mut baseline),
        );
        assert_eq!(second.minor, 10, "{:?}", second.processes);
        assert_eq!(second.processes[0].pid, 0);
        assert_eq!(second.processes[0].processes, 1);
        assert_eq!(second.callsites_total, 1);
        assert_eq!(second.callsites[0].count, 10);
    }
}
