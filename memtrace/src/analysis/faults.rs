//! `memtrace faults`: major and minor page faults per process, thread and callsite.
use std::time::{Duration, Instant};

use crate::{
    collector::Collector,
    engine::{self, process_alive, Analysis, ReportContext, ReportKind, DRAIN_BATCH, DRAIN_BUDGET},
    hooks::{self, HookGroup},
    loader::{FaultRecords, Tracer},
    report::{self, FaultReport, IntervalBaseline, ReportInput, ReportOptions},
    ring::Ring,
    sideband::{self, Sideband},
    stacks::UserStack,
    symbolize::Symbolizer,
    Error,
};

/// The process table with its fault aggregates, the perf side-band that keeps mappings of
/// short-lived processes, and what reports need between runs of the loop.
pub struct FaultsAnalysis {
    collector: Collector,
    sideband: Option<Sideband>,
    symbolizer: Symbolizer,
    opts: ReportOptions,
    /// The totals as of the previous interval report: interval reports show what changed.
    baseline: IntervalBaseline,
    /// Nodes of the collector's stack tree already handed to the symbolizer.
    tree_seen: usize,
    last_ahead: Instant,
    /// `kmem:rss_stat` per thread (`memtrace watch --trace`): the map, once loaded.
    rss: Option<Option<RssThreads>>,
    /// Each CPU's batch of fault records not yet written to the ring (records at entry).
    batches: Option<FaultBatches>,
    /// The time of each CPU's oldest record still in its batch (0: none).
    batch_first: Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
}

type FaultBatches = aya::maps::PerCpuArray<aya::maps::MapData, memtrace_common::FaultBatch>;

type RssThreads = aya::maps::HashMap<aya::maps::MapData, u32, memtrace_common::RssThread>;

/// How often, when the ring is empty, new stacks are symbolized ahead of the report, and for
/// how long at most: a report then symbolizes only what came since, and takes well under a
/// second even when a busy host ran thousands of programs since the last one. Each round
/// parses the files it touches again (blazesym instances are not kept), so rounds are spaced:
/// every 5 s cost a busy run ~25% more agent CPU per record. A longer round costs nothing
/// more overall (what it does not do, the report does), and the ring holds what comes
/// meanwhile: a busy build's first 30 s left 0.5-0.8 s of symbolizing to the first report
/// with 100 ms rounds.
const AHEAD_EVERY: Duration = Duration::from_secs(10);

/// How far behind the present side-band events and exits may be held for records still in a
/// CPU's batch (a batch goes out at its CPU's next context switch, fault or record; a CPU that
/// does none of these for this long has records that old at most this rare).
const SETTLE_LAG_MAX_NS: u64 = 100_000_000;
const AHEAD_BUDGET: Duration = Duration::from_millis(300);

impl FaultsAnalysis {
    pub fn new(opts: ReportOptions) -> Self {
        Self {
            collector: Collector::default(),
            sideband: None,
            symbolizer: Symbolizer::new(),
            opts,
            baseline: IntervalBaseline::default(),
            tree_seen: 0,
            last_ahead: Instant::now(),
            rss: None,
            batches: None,
            batch_first: None,
        }
    }

    /// Also traces `kmem:rss_stat`: each thread's share of its process's anonymous RSS
    /// changes, in the report's `rss_threads`.
    pub fn with_rss_stat(opts: ReportOptions) -> Self {
        Self {
            rss: Some(None),
            ..Self::new(opts)
        }
    }

    /// Each thread's anonymous RSS changes so far; `tracing_start_ns` converts their times.
    fn rss_threads(&self, tracing_start_ns: u64) -> Vec<report::RssThreadReport> {
        let Some(Some(map)) = &self.rss else {
            return Vec::new();
        };
        let secs = |ns: u64| ns.saturating_sub(tracing_start_ns) as f64 / 1e9;
        let mut threads: Vec<report::RssThreadReport> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(tid, t)| report::RssThreadReport {
                pid: t.pid,
                tid,
                grown_bytes: t.grown,
                shrunk_bytes: t.shrunk,
                first_s: secs(t.first_ns),
                last_s: secs(t.last_ns),
            })
            .collect();
        threads.sort_by(|a, b| b.grown_bytes.cmp(&a.grown_bytes).then(a.tid.cmp(&b.tid)));
        threads
    }

    pub(crate) fn collector_mut(&mut self) -> &mut Collector {
        &mut self.collector
    }

    /// The process table and the symbolizer, for an analysis built on this one.
    pub(crate) fn parts(&mut self) -> (&Collector, &mut Symbolizer) {
        (&self.collector, &mut self.symbolizer)
    }

    /// Hands the frames of stacks new since the last call to the symbolizer, and symbolizes
    /// some of them.
    fn symbolize_ahead(&mut self) {
        self.last_ahead = Instant::now();
        let tree = &self.collector.user_stacks;
        // A rebuilt tree may be smaller: its frames were seen before it was rebuilt.
        let from = self.tree_seen.min(tree.len());
        for (path, offset) in tree.file_frames_from(from) {
            self.symbolizer.want_frame(path, offset, 0);
        }
        self.tree_seen = tree.len();
        let mut stack = UserStack::default();
        for info in self.collector.processes.values_mut() {
            let from = info.stacks_seen.min(info.stacks.len());
            for i in from..info.stacks.len() {
                if let Some(ips) = info.stacks.get(i as u32) {
                    stack.resolve_into(&info.space, ips);
                    self.symbolizer.want_user(&stack, 0);
                }
            }
            info.stacks_seen = info.stacks.len();
        }
        self.symbolizer.symbolize_some(AHEAD_BUDGET);
    }
}

const HOOK_GROUPS: &[&HookGroup] = &[&hooks::PROCESSES, &hooks::MAPPINGS, &hooks::FAULTS];
const HOOK_GROUPS_RSS: &[&HookGroup] = &[
    &hooks::PROCESSES,
    &hooks::MAPPINGS,
    &hooks::FAULTS,
    &hooks::RSS,
];

impl Analysis for FaultsAnalysis {
    type Report = FaultReport;

    fn what(&self) -> &'static str {
        "page faults"
    }

    fn hook_groups(&self) -> &'static [&'static HookGroup] {
        if self.rss.is_some() {
            HOOK_GROUPS_RSS
        } else {
            HOOK_GROUPS
        }
    }

    fn start(&mut self, tracer: &mut Tracer, system_wide: bool) -> Result<(), Error> {
        if self.rss.is_some() {
            let map = tracer.take_map("RSS_THREADS")?;
            self.rss = Some(Some(
                aya::maps::HashMap::try_from(map).map_err(|e| Error::Map(e.to_string()))?,
            ));
        }
        if matches!(tracer.fault_records, FaultRecords::AtEntry { .. }) {
            let map = tracer.take_map("FAULT_BATCHES")?;
            self.batches =
                Some(aya::maps::PerCpuArray::try_from(map).map_err(|e| Error::Map(e.to_string()))?);
            let map = tracer.take_map("FAULT_BATCH_FIRST")?;
            self.batch_first =
                Some(aya::maps::PerCpuArray::try_from(map).map_err(|e| Error::Map(e.to_string()))?);
            self.collector.batched_faults = true;
        }
        self.collector.follow_all = system_wide;
        // Opened before any command starts, so its exec and first mappings are recorded.
        match Sideband::open() {
            Ok(sideband) => {
                self.collector.sideband = true;
                self.sideband = Some(sideband);
            }
            Err(e) => engine::say(format_args!(
                "memtrace: no perf side-band ({e}): mappings of processes that exit quickly \
                 may go unclassified"
            )),
        }
        Ok(())
    }

    fn target_added(&mut self, pid: u32) {
        self.collector.observe_from_now(pid);
    }

    /// Hands waiting ring-buffer records to the collector, merged in time order with the
    /// side-band's records.
    fn drain(&mut self, ring: &mut Ring) -> bool {
        let started = std::time::Instant::now();
        let collector = &mut self.collector;
        let mut sideband = self.sideband.as_mut();
        // Every side-band record older than `cutoff` has been read: a ring record up to that
        // time is handled after the mappings and execs that came before it.
        let mut catch_up = |collector: &mut Collector| {
            let now = sideband::monotonic_ns();
            if let Some(sideband) = sideband.as_deref_mut() {
                collector.queue_side(sideband.poll());
                collector.stats.sideband_lost = sideband.lost();
            }
            now
        };
        // Records still in a CPU's batch are older than any that come later: side-band
        // events and exits are applied only up to the oldest of them.
        let batch_first = self.batch_first.as_ref();
        let settle_limit = || {
            let now = sideband::monotonic_ns();
            batch_first.map_or(u64::MAX, |m| {
                m.get(&0, 0)
                    .ok()
                    .and_then(|per_cpu| per_cpu.iter().copied().filter(|&t| t != 0).min())
                    .map_or(now, |t| t.saturating_sub(1).min(now))
                    // A CPU that faulted once and then only computes (or went offline) must
                    // not hold every process's mappings and exits back for long.
                    .max(now.saturating_sub(SETTLE_LAG_MAX_NS))
            })
        };
        collector.settle_limit = settle_limit();
        let mut cutoff = catch_up(collector);
        let mut more = true;
        for n in 0..DRAIN_BATCH {
            if n % 1024 == 1023 && started.elapsed() >= DRAIN_BUDGET {
                break;
            }
            let Some(item) = ring.next() else {
                more = false;
                break;
            };
            // A record newer than the side-band read so far: read the side-band again first.
            if crate::record::time_of(&item).is_some_and(|t| t > cutoff) {
                cutoff = catch_up(collector);
            }
            collector.on_bytes(&item);
        }
        if !more {
            collector.settle(cutoff.min(settle_limit()));
        }
        collector.sweep();
        if !more && self.last_ahead.elapsed() >= AHEAD_EVERY {
            self.symbolize_ahead();
        }
        more
    }

    fn descendants_alive(&self, command: u32) -> bool {
        // An exit record settles it; /proc covers a record not read (or lost).
        let c = &self.collector;
        c.spawned
            .iter()
            .filter(|&&pid| pid != command)
            .any(|&pid| !c.processes.get(&pid).is_some_and(|p| p.exited) && process_alive(pid))
    }

    fn report(&mut self, ctx: &ReportContext<'_>) -> FaultReport {
        if ctx.kind == ReportKind::Final {
            // The last records of each CPU may still wait in its batch (a CPU that went quiet
            // writes its batch out at its next fault): read them where they are.
            if let Some(batches) = &self.batches {
                if let Ok(per_cpu) = batches.get(&0, 0) {
                    let mut left: Vec<memtrace_common::BatchedFault> = per_cpu
                        .iter()
                        .flat_map(|b| {
                            b.records
                                .iter()
                                .take((b.count as usize).min(b.records.len()))
                        })
                        .copied()
                        .collect();
                    left.sort_by_key(|f| f.time_ns);
                    self.collector.on_leftovers(&left);
                }
            }
            // Every record is in: exits and mapping changes still queued apply now.
            self.collector.settle(u64::MAX);
            // A thread's last fault settles at its next one: ask /proc for those still open.
            self.collector.flush_pending(None, true);
        }
        let input = ReportInput {
            fault_records: ctx.tracer.fault_records,
            latency_windows: ctx.tracer.latency_windows(),
            collector: &self.collector,
            counters: ctx.tracer.counters(),
            elapsed: ctx.elapsed,
            covers: ctx.covers,
            command_faults: ctx.command_faults,
        };
        let since = match ctx.kind {
            ReportKind::Interval => Some(&mut self.baseline),
            ReportKind::Final => None,
        };
        let started = std::time::Instant::now();
        let interval = since.is_some();
        let mut r = report::build(&input, &mut self.symbolizer, &self.opts, since);
        let tracing_start_ns =
            sideband::monotonic_ns().saturating_sub(ctx.elapsed.as_nanos() as u64);
        r.rss_threads = self.rss_threads(tracing_start_ns);
        if interval {
            self.collector.end_interval();
        }
        // A diagnostic for developers: where the agent's memory and report time go.
        if std::env::var_os("MEMTRACE_FOOTPRINT").is_some() {
            eprintln!(
                "footprint: {} | {} | rss {} MiB, peak {} MiB, report built in {} ms",
                self.collector.footprint(),
                self.symbolizer.footprint(),
                r.agent.rss_bytes >> 20,
                r.agent.peak_rss_bytes >> 20,
                started.elapsed().as_millis()
            );
        }
        r
    }
}
