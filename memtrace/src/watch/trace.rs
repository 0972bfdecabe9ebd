//! `memtrace watch --trace`: once something grows, the matching analysis runs on it for a
//! while, in a thread of its own, and names the code responsible: `faults` for a process's
//! private memory, `vma` for its address space, `slab` for a cache.
use std::{
    ops::ControlFlow,
    sync::mpsc::{channel, Receiver, Sender},
    thread::JoinHandle,
    time::Duration,
};

use super::{FindingKind, TracedCallsite};
use crate::{
    addrspace::MappingClass,
    analysis::{
        slab::{default_max_tracked, slab_max_sites},
        FaultsAnalysis, SlabAnalysis, SlabReportOptions, VmaAnalysis,
    },
    engine::{self, Analysis, ReportKind, RunOptions, Target},
    loader::{SlabOptions, TracerOptions},
    report::{Format, ReportOptions, RssThreadReport},
    slab::GroupBy,
};

/// Callsites kept per finding.
const CALLSITES: usize = 3;

/// Traces that run at once at most: each loads its own programs and ring (a build host can
/// flag a dozen compilers in one sample); later findings wait for the next sample with room.
pub const MAX_RUNNING: usize = 3;

/// What a trace found for one finding.
#[derive(Debug)]
pub struct TraceResult {
    pub kind: FindingKind,
    /// The finding's key: the pid, or the cache's name.
    pub key: String,
    pub callsites: Vec<TracedCallsite>,
    /// With `kmem:rss_stat` (USS growth): the threads that grew the process's RSS, with
    /// their times in seconds since the watch began.
    pub threads: Vec<RssThreadReport>,
    /// Why there are none, when there are none.
    pub note: Option<String>,
}

/// The traces started so far and the channel their results come back on.
pub struct Tracing {
    tx: Sender<TraceResult>,
    rx: Receiver<TraceResult>,
    running: Vec<JoinHandle<()>>,
}

impl Default for Tracing {
    fn default() -> Self {
        let (tx, rx) = channel();
        Self {
            tx,
            rx,
            running: Vec::new(),
        }
    }
}

impl Tracing {
    /// Traces what a finding names for `duration`, from `at_s` seconds into the watch.
    pub fn start(
        &mut self,
        kind: FindingKind,
        pid: Option<u32>,
        cache: Option<String>,
        duration: Duration,
        at_s: f64,
    ) {
        let tx = self.tx.clone();
        let key = match (&cache, pid) {
            (Some(c), _) => c.clone(),
            (None, Some(pid)) => pid.to_string(),
            (None, None) => return,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("trace-{}", kind.as_str()))
            .spawn(move || {
                let (callsites, mut threads, note) = match trace(kind, pid, cache, duration) {
                    Ok((c, t)) if c.is_empty() => (c, t, Some("tracing saw no callsite".into())),
                    Ok((c, t)) => (c, t, None),
                    Err(e) => (Vec::new(), Vec::new(), Some(e)),
                };
                for t in &mut threads {
                    t.first_s += at_s;
                    t.last_s += at_s;
                }
                let _ = tx.send(TraceResult {
                    kind,
                    key,
                    callsites,
                    threads,
                    note,
                });
            });
        match spawned {
            Ok(handle) => self.running.push(handle),
            Err(e) => log::warn!("cannot start a trace thread: {e}"),
        }
    }

    /// Results that have come back (and the threads that sent them reaped).
    pub fn results(&mut self) -> Vec<TraceResult> {
        self.running.retain(|h| !h.is_finished());
        self.rx.try_iter().collect()
    }

    /// Traces running now.
    pub fn running(&self) -> usize {
        self.running.iter().filter(|h| !h.is_finished()).count()
    }

    /// Waits for every trace to end (each ends at its duration, or at the stop signal).
    pub fn finish(&mut self) -> Vec<TraceResult> {
        for handle in self.running.drain(..) {
            let _ = handle.join();
        }
        self.results()
    }

    pub fn active(&self) -> bool {
        self.running.iter().any(|h| !h.is_finished())
    }
}

/// Runs one analysis to its end and keeps what its final report says.
fn run_to_end<A: Analysis>(
    analysis: &mut A,
    opts: &RunOptions,
    mut keep: impl FnMut(&A::Report),
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime
        .block_on(engine::run(analysis, opts, |report, kind| {
            if kind == ReportKind::Final {
                keep(report);
            }
            ControlFlow::Continue(())
        }))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Threads kept per finding.
const THREADS: usize = 5;

fn trace(
    kind: FindingKind,
    pid: Option<u32>,
    cache: Option<String>,
    duration: Duration,
) -> Result<(Vec<TracedCallsite>, Vec<RssThreadReport>), String> {
    let ringbuf_bytes = 16 << 20;
    match (kind, pid, cache) {
        (FindingKind::Uss, Some(pid), _) => {
            let report = ReportOptions {
                format: Format::Json,
                top: 50,
                threads: false,
                hist: false,
            };
            let mut analysis = FaultsAnalysis::with_rss_stat(report);
            let opts = RunOptions {
                target: Target::Pids(vec![pid]),
                duration: Some(duration),
                interval: None,
                tracer: TracerOptions {
                    capture_stacks: true,
                    stack_cache: true,
                    ringbuf_bytes,
                    ..TracerOptions::default()
                },
            };
            let mut found = Vec::new();
            let mut threads = Vec::new();
            run_to_end(&mut analysis, &opts, |r| {
                threads = r
                    .rss_threads
                    .iter()
                    .filter(|t| t.pid == pid && t.grown_bytes > 0)
                    .take(THREADS)
                    .cloned()
                    .collect();
                // Faults on private memory: what grows USS (file pages are the page cache's).
                found = r
                    .callsites
                    .iter()
                    .filter(|c| {
                        c.pid == pid
                            && matches!(
                                c.mapping.class,
                                MappingClass::AnonPrivate
                                    | MappingClass::Heap
                                    | MappingClass::Stack
                            )
                    })
                    .take(CALLSITES)
                    .map(|c| TracedCallsite {
                        frames: c.frames.iter().map(|f| f.display()).collect(),
                        count: c.count,
                        what: "faults",
                    })
                    .collect();
            })?;
            Ok((found, threads))
        }
        (FindingKind::Slab, _, Some(cache)) => {
            let max_tracked = default_max_tracked();
            let mut analysis = SlabAnalysis::new(SlabReportOptions {
                by: GroupBy::Callsite,
                min_age: None,
                caches: vec![cache],
                top: 50,
                format: Format::Json,
                stacks: false,
                user_stacks: false,
                max_tracked,
                pages: false,
                percpu: false,
                vmalloc: false,
            });
            let opts = RunOptions {
                target: Target::System,
                duration: Some(duration),
                interval: None,
                tracer: TracerOptions {
                    capture_stacks: false,
                    ringbuf_bytes,
                    slab: SlabOptions {
                        max_tracked,
                        max_sites: slab_max_sites(),
                        max_stacks: 0,
                        kernel_stacks: false,
                        user_stacks: false,
                    },
                    ..TracerOptions::default()
                },
            };
            let mut found = Vec::new();
            run_to_end(&mut analysis, &opts, |r| {
                let mut groups: Vec<_> = r.groups.iter().filter(|g| g.growth_objects > 0).collect();
                groups.sort_by_key(|g| std::cmp::Reverse(g.growth_objects));
                found = groups
                    .into_iter()
                    .take(CALLSITES)
                    .map(|g| TracedCallsite {
                        frames: g.callsite.iter().cloned().collect(),
                        count: g.growth_objects as u64,
                        what: "objects more",
                    })
                    .collect();
            })?;
            Ok((found, Vec::new()))
        }
        (FindingKind::AddressSpace, Some(pid), _) => {
            let mut analysis = VmaAnalysis::new(50, false);
            let opts = RunOptions {
                target: Target::Pids(vec![pid]),
                duration: Some(duration),
                interval: None,
                tracer: TracerOptions {
                    capture_stacks: false,
                    vma_stacks: true,
                    ringbuf_bytes,
                    ..TracerOptions::default()
                },
            };
            let mut found = Vec::new();
            run_to_end(&mut analysis, &opts, |r| {
                // What it mapped while traced and still holds: the growth.
                found = r
                    .callsites
                    .iter()
                    .filter(|c| c.pid == pid && c.outstanding_bytes > 0)
                    .take(CALLSITES)
                    .map(|c| TracedCallsite {
                        frames: c.frames.iter().map(|f| f.display()).collect(),
                        count: c.outstanding_bytes,
                        what: "bytes mapped",
                    })
                    .collect();
            })?;
            Ok((found, Vec::new()))
        }
        _ => Err("nothing to trace".into()),
    }
}
