//! `memtrace watch`: samples process and slab memory over time and flags steady growth (a
//! leak) with its rate and how sure it is; with `--trace`, names the code responsible.
//!
//! Watching named processes, USS is exact (`smaps_rollup`). Watching every process, it is the
//! resident private memory from `statm` (RssAnon: O(1) to read, where smaps_rollup walks the
//! page tables), so a busy host costs well under 1% of a CPU at one sample a second.
pub mod plot;
mod render;
pub mod series;
pub mod trace;
pub mod trend;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use serde::Serialize;

pub use render::{live_line, render};
use series::Series;
use trend::Trend;

use crate::{
    procmem::{self, Reader, Unreadable},
    report::AgentStats,
    slab::caches::{slabinfo_rows, SLABINFO},
};

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A process's private memory grows.
    Uss,
    /// A slab cache grows.
    Slab,
    /// A process's address space grows faster than what it touches (VIRT up, RES not).
    AddressSpace,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uss => "uss",
            Self::Slab => "slab",
            Self::AddressSpace => "address_space",
        }
    }
}

/// How much a series must grow in its window, and how surely, to be flagged.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// Least growth over the window, bytes: process memory.
    pub process_growth: u64,
    /// Least growth over the window, bytes: one slab cache.
    pub slab_growth: u64,
    pub min_confidence: f64,
    /// Also flag reclaimable slab caches (dentries, inodes, buffer heads: they grow with the
    /// page cache, and the kernel shrinks them under memory pressure).
    pub reclaimable: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            process_growth: 1 << 20,
            slab_growth: 256 << 10,
            min_confidence: 0.7,
            reclaimable: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Processes to watch; empty: every process.
    pub pids: Vec<u32>,
    pub interval: Duration,
    /// The trend window.
    pub window: Duration,
    pub duration: Option<Duration>,
    pub thresholds: Thresholds,
}

/// A callsite a traced analysis found behind a finding.
#[derive(Clone, Debug, Serialize)]
pub struct TracedCallsite {
    /// Innermost first, as `memtrace faults` and `slab` give them.
    pub frames: Vec<String>,
    /// Faults, mapped bytes or slab bytes, as the analysis counts them.
    pub count: u64,
    pub what: &'static str,
}

/// Steady growth found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// From the latest window that showed growth.
    pub rate_bytes_per_s: f64,
    pub confidence: f64,
    /// When the growth was first flagged (seconds since the watch began).
    pub flagged_at_s: f64,
    /// The latest value, and its change since the first sample (for `address_space`, VSS less
    /// USS: the address space not backed by private memory).
    pub bytes: u64,
    pub growth_bytes: i64,
    /// Still growing in the last window.
    pub growing: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exited: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub callsites: Vec<TracedCallsite>,
    /// With --trace, for USS growth: the threads whose updates grew the process's anonymous
    /// RSS (`kmem:rss_stat`), when, in seconds since the watch began.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<crate::report::RssThreadReport>,
    /// With --trace: what tracing said when it found no callsite (or could not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_note: Option<String>,
}

/// A watched process's series.
#[derive(Debug)]
struct Watched {
    comm: String,
    uss: Series,
    vss: Series,
    /// VSS less USS: address space not backed by private memory.
    untouched: Series,
    exited: bool,
    /// Last seen alive at this sample.
    seen: u64,
}

/// Why a watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEnd {
    Deadline,
    Signal,
    TargetsExited,
}

/// `memtrace watch`'s report: the findings, what was watched, and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct WatchReport {
    pub duration_s: f64,
    pub interval_s: f64,
    pub window_s: f64,
    pub samples: u64,
    /// Where USS comes from: `smaps_rollup` (exact) or `statm` (resident private memory).
    pub uss_source: &'static str,
    /// Processes watched at the end, and those that exited meanwhile (with -p).
    pub processes: usize,
    pub exited: usize,
    pub caches: usize,
    pub findings: Vec<Finding>,
    /// Processes that exited, could not be read, and why slab caches are not watched.
    pub notes: Vec<String>,
    pub ended_by: WatchEnd,
    /// The watch's own CPU time and memory.
    pub agent: AgentStats,
    /// Its CPU as a share of one CPU over the watch.
    pub cpu_percent: f64,
}

/// The sampler: every series, the findings so far.
pub struct Watcher {
    opts: WatchOptions,
    exact_uss: bool,
    reader: Reader,
    page: u64,
    processes: BTreeMap<u32, Watched>,
    caches: HashMap<String, Series>,
    /// Caches the kernel reclaims under memory pressure (`reclaim_account`), not flagged
    /// unless asked.
    reclaimable: std::collections::HashSet<String>,
    slab_error: Option<String>,
    slab_buf: String,
    findings: BTreeMap<(FindingKind, String), Finding>,
    notes: Vec<String>,
    samples: u64,
    started: Instant,
}

/// What one sample changed.
#[derive(Debug, Default)]
pub struct SampleOutcome {
    /// Findings flagged for the first time in this sample (keys into the findings).
    pub new: Vec<(FindingKind, Option<u32>, Option<String>)>,
    /// Every watched `-p` process has exited.
    pub all_exited: bool,
}

impl Watcher {
    /// Checks the `-p` processes once: each one gone, a kernel thread or unreadable is noted
    /// and left out; an error when none is left to watch.
    pub fn new(opts: WatchOptions) -> Result<Self, WatchError> {
        let exact_uss = !opts.pids.is_empty();
        let mut w = Self {
            exact_uss,
            reader: Reader::default(),
            page: procmem::page_size(),
            processes: BTreeMap::new(),
            caches: HashMap::new(),
            reclaimable: std::collections::HashSet::new(),
            slab_error: None,
            slab_buf: String::new(),
            findings: BTreeMap::new(),
            notes: Vec::new(),
            samples: 0,
            started: Instant::now(),
            opts,
        };
        if exact_uss {
            let mut refused = Vec::new();
            for &pid in &w.opts.pids {
                match w.reader.process(pid, false) {
                    Ok(p) => {
                        w.processes.insert(pid, Watched::new(p.comm));
                    }
                    Err(reason) => {
                        w.notes.push(format!("pid {pid}: {}", reason.describe()));
                        refused.push((pid, reason));
                    }
                }
            }
            if w.processes.is_empty() {
                return Err(WatchError::NothingToWatch(refused));
            }
        }
        Ok(w)
    }

    /// Samples every interval until `-d` elapses, a stop signal comes or every `-p` process
    /// has exited; `on_sample` sees the watcher after each sample (and may stop it).
    pub fn run(
        &mut self,
        mut on_sample: impl FnMut(&mut Self, &SampleOutcome) -> std::ops::ControlFlow<()>,
    ) -> WatchEnd {
        let interval = self.opts.interval;
        let deadline = self.opts.duration.map(|d| self.started + d);
        let mut next = self.started;
        loop {
            let outcome = self.sample();
            if on_sample(self, &outcome).is_break() {
                return WatchEnd::Signal;
            }
            if outcome.all_exited {
                return WatchEnd::TargetsExited;
            }
            next += interval;
            // Behind (a slow sample, a suspended process): the next tick from now.
            let now = Instant::now();
            if next < now {
                next = now + interval;
            }
            // Waits in short steps, so a signal or the deadline ends the watch promptly.
            loop {
                if crate::engine::stop_signal().is_some() {
                    return WatchEnd::Signal;
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return WatchEnd::Deadline;
                }
                if now >= next {
                    break;
                }
                let until = deadline.map_or(next, |d| d.min(next));
                std::thread::sleep((until - now).min(Duration::from_millis(100)));
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Takes one sample of every series and updates the findings.
    pub fn sample(&mut self) -> SampleOutcome {
        let t = self.started.elapsed().as_secs_f64();
        let window_s = self.opts.window.as_secs_f64();
        self.samples += 1;
        let n = self.samples;
        if self.exact_uss {
            let pids: Vec<u32> = self
                .processes
                .iter()
                .filter(|(_, w)| !w.exited)
                .map(|(&p, _)| p)
                .collect();
            for pid in pids {
                match self.reader.process(pid, false) {
                    Ok(p) => {
                        if let Some(w) = self.processes.get_mut(&pid) {
                            w.push(t, p.uss, p.vss, window_s, n);
                            // It may exec (a shell's child becomes python).
                            w.comm = p.comm;
                        }
                    }
                    Err(reason) => {
                        if let Some(w) = self.processes.get_mut(&pid) {
                            w.exited = true;
                            let what = match reason {
                                Unreadable::Gone => format!("exited after {t:.0}s"),
                                other => format!("unreadable after {t:.0}s: {}", other.describe()),
                            };
                            self.notes.push(format!("pid {pid} ({}) {what}", w.comm));
                        }
                    }
                }
            }
        } else {
            self.sample_every_process(t, window_s, n);
        }
        // Kernel memory is not any one process's: with -p, only those processes.
        if !self.exact_uss {
            self.sample_slab(t, window_s);
        }
        let mut outcome = SampleOutcome {
            new: self.update_findings(t),
            all_exited: false,
        };
        outcome.all_exited = self.exact_uss && self.processes.values().all(|w| w.exited);
        outcome
    }

    /// Every process's statm: VSS, and resident private memory for USS.
    fn sample_every_process(&mut self, t: f64, window_s: f64, n: u64) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut buf = String::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            buf.clear();
            if read_into(&format!("/proc/{pid}/statm"), &mut buf).is_err() {
                continue;
            }
            let mut f = buf
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let (size, resident, shared) = (
                f.next().unwrap_or(0),
                f.next().unwrap_or(0),
                f.next().unwrap_or(0),
            );
            // Kernel threads have no address space.
            if size == 0 {
                continue;
            }
            // A pid seen gone, back again: another process. The old one's findings stay in
            // the report under their own key; the new one starts its series afresh.
            if self.processes.get(&pid).is_some_and(|w| w.exited) {
                self.processes.remove(&pid);
                let key = pid.to_string();
                let old: Vec<(FindingKind, String)> = self
                    .findings
                    .keys()
                    .filter(|(_, k)| *k == key)
                    .cloned()
                    .collect();
                for (kind, k) in old {
                    if let Some(f) = self.findings.remove(&(kind, k.clone())) {
                        self.findings
                            .insert((kind, format!("{k}@{:.3}", f.flagged_at_s)), f);
                    }
                }
            }
            let watched = self.processes.entry(pid).or_insert_with(|| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_default();
                Watched::new(comm)
            });
            let private = resident.saturating_sub(shared) * self.page;
            watched.push(t, private, size * self.page, window_s, n);
        }
        // Gone since the last sample: kept while a finding names it, else dropped.
        let findings = &self.findings;
        self.processes.retain(|&pid, w| {
            if w.seen == n {
                return true;
            }
            w.exited = true;
            findings
                .keys()
                .any(|(_, key)| key.parse::<u32>().ok() == Some(pid))
        });
    }

    fn sample_slab(&mut self, t: f64, window_s: f64) {
        if self.slab_error.is_some() {
            return;
        }
        let mut buf = std::mem::take(&mut self.slab_buf);
        buf.clear();
        match read_into(SLABINFO, &mut buf) {
            Ok(()) => {
                // Straight from the text: a new String only for a cache not seen before.
                for (name, row) in slabinfo_rows(&buf) {
                    let bytes = row.active_objs * row.objsize;
                    match self.caches.get_mut(name) {
                        Some(series) => series.push(t, bytes, window_s),
                        None => {
                            let mut series = Series::default();
                            series.push(t, bytes, window_s);
                            self.caches.insert(name.to_string(), series);
                            if is_reclaimable(name) {
                                self.reclaimable.insert(name.to_string());
                            }
                        }
                    }
                }
            }
            Err(e) => {
                let e = format!("{SLABINFO}: {e}");
                self.notes.push(format!("slab caches not watched: {e}"));
                self.slab_error = Some(e);
            }
        }
        self.slab_buf = buf;
    }

    /// The window's trend for each series; new findings returned.
    fn update_findings(&mut self, t: f64) -> Vec<(FindingKind, Option<u32>, Option<String>)> {
        let th = self.opts.thresholds;
        let min_span =
            (self.opts.window.as_secs_f64() / 3.0).max(3.0 * self.opts.interval.as_secs_f64());
        let mut new = Vec::new();
        let findings = &mut self.findings;
        // One series: its trend when it could be steady growth, its finding updated or made.
        let mut judge =
            |series: &mut Series,
             least: u64,
             kind: FindingKind,
             key: &str,
             value: u64,
             subject: &dyn Fn() -> (Option<u32>, Option<String>, Option<String>)| {
                let (Some(&(t0, first_in_window)), Some(last)) =
                    (series.window.front(), series.last())
                else {
                    return;
                };
                // Cheap tests first: most series on a quiet host have not grown in the window.
                let may_grow = t - t0 >= min_span && last >= first_in_window + least;
                let growing = may_grow
                    .then(|| fit(series))
                    .flatten()
                    .filter(|tr| tr.confidence >= th.min_confidence && tr.rate > 0.0);
                let since_first = series
                    .first
                    .map_or(0, |(_, first)| last as i64 - first as i64);
                let map_key = (kind, key.to_string());
                if let Some(f) = findings.get_mut(&map_key) {
                    f.bytes = value;
                    f.growth_bytes = since_first;
                    f.growing = growing.is_some();
                    if let Some(tr) = growing {
                        f.rate_bytes_per_s = tr.rate;
                        f.confidence = tr.confidence;
                    }
                    return;
                }
                let Some(tr) = growing else {
                    return;
                };
                let (pid, comm, cache) = subject();
                new.push((kind, pid, cache.clone()));
                findings.insert(
                    map_key,
                    Finding {
                        kind,
                        pid,
                        comm,
                        cache,
                        rate_bytes_per_s: tr.rate,
                        confidence: tr.confidence,
                        flagged_at_s: t,
                        bytes: value,
                        growth_bytes: since_first,
                        growing: true,
                        exited: false,
                        callsites: Vec::new(),
                        threads: Vec::new(),
                        trace_note: None,
                    },
                );
            };
        for (&pid, w) in self.processes.iter_mut() {
            if w.exited {
                continue;
            }
            let key = pid.to_string();
            let comm = &w.comm;
            // The name now, read when a finding is made (it may have exec'd since first seen).
            let subject = || {
                let now = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_else(|_| comm.clone());
                (Some(pid), Some(now), None)
            };
            let uss = w.uss.last().unwrap_or(0);
            judge(
                &mut w.uss,
                th.process_growth,
                FindingKind::Uss,
                &key,
                uss,
                &subject,
            );
            // Its size: address space not backed by private memory (VSS - USS), the series
            // its rate and growth are of.
            let untouched = w.untouched.last().unwrap_or(0);
            judge(
                &mut w.untouched,
                th.process_growth,
                FindingKind::AddressSpace,
                &key,
                untouched,
                &subject,
            );
        }
        for (name, series) in self.caches.iter_mut() {
            if !th.reclaimable && self.reclaimable.contains(name) {
                continue;
            }
            let bytes = series.last().unwrap_or(0);
            let subject = || (None, None, Some(name.clone()));
            judge(
                series,
                th.slab_growth,
                FindingKind::Slab,
                name,
                bytes,
                &subject,
            );
        }
        // A finding's process that has exited since.
        for ((kind, key), f) in self.findings.iter_mut() {
            if *kind != FindingKind::Slab {
                let gone = key
                    .parse::<u32>()
                    .ok()
                    .and_then(|pid| self.processes.get(&pid))
                    .is_none_or(|w| w.exited);
                if gone {
                    f.exited = true;
                    f.growing = false;
                }
            }
        }
        new
    }

    /// Findings growing now, fastest first.
    pub fn growing(&self) -> Vec<&Finding> {
        let mut g: Vec<&Finding> = self.findings.values().filter(|f| f.growing).collect();
        g.sort_by(|a, b| b.rate_bytes_per_s.total_cmp(&a.rate_bytes_per_s));
        g
    }

    /// Starts every slab cache's trend afresh: a trace loading its kernel programs and maps
    /// is itself kernel memory (kmalloc-cg-2k, proc inodes), not a leak to flag.
    pub fn restart_slab_trends(&mut self) {
        for series in self.caches.values_mut() {
            series.window.clear();
        }
    }

    /// Attaches what traces found to their findings.
    pub fn apply_traces(&mut self, results: Vec<trace::TraceResult>) {
        for r in results {
            if let Some(f) = self.findings.get_mut(&(r.kind, r.key)) {
                f.callsites = r.callsites;
                f.threads = r.threads;
                f.trace_note = r.note;
            }
        }
    }

    pub fn watched_processes(&self) -> usize {
        self.processes.values().filter(|w| !w.exited).count()
    }

    pub fn watched_caches(&self) -> usize {
        self.caches.len()
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The series to plot: every finding's, and with `-p` every watched process's.
    pub fn plot_series(&self) -> Vec<plot::Line> {
        let mut lines = Vec::new();
        let flagged =
            |kind: FindingKind, key: &str| self.findings.contains_key(&(kind, key.to_string()));
        for (&pid, w) in &self.processes {
            let key = pid.to_string();
            if self.exact_uss || flagged(FindingKind::Uss, &key) {
                lines.push(plot::Line {
                    panel: plot::Panel::Processes,
                    label: format!("{pid} {} uss", w.comm),
                    points: w.uss.history.points.clone(),
                    flagged: flagged(FindingKind::Uss, &key),
                });
            }
            if self.exact_uss || flagged(FindingKind::AddressSpace, &key) {
                lines.push(plot::Line {
                    panel: plot::Panel::AddressSpace,
                    label: format!("{pid} {} vss", w.comm),
                    points: w.vss.history.points.clone(),
                    flagged: flagged(FindingKind::AddressSpace, &key),
                });
            }
        }
        let mut caches: Vec<(&String, &Series)> = self.caches.iter().collect();
        // Flagged caches, then the largest, eight at most.
        caches.sort_by_key(|(name, s)| {
            (
                !flagged(FindingKind::Slab, name),
                std::cmp::Reverse(s.last().unwrap_or(0)),
            )
        });
        for (name, s) in caches.into_iter().take(8) {
            lines.push(plot::Line {
                panel: plot::Panel::Slab,
                label: name.clone(),
                points: s.history.points.clone(),
                flagged: flagged(FindingKind::Slab, name),
            });
        }
        lines
    }

    /// The report, as of now.
    pub fn report(&self, ended_by: WatchEnd) -> WatchReport {
        let mut findings: Vec<Finding> = self.findings.values().cloned().collect();
        findings.sort_by(|a, b| {
            b.growing
                .cmp(&a.growing)
                .then(b.rate_bytes_per_s.total_cmp(&a.rate_bytes_per_s))
        });
        let elapsed = self.started.elapsed().as_secs_f64();
        let agent = AgentStats::current(0);
        let cpu_percent = if elapsed > 0.0 {
            100.0 * (agent.cpu_user_s + agent.cpu_sys_s) / elapsed
        } else {
            0.0
        };
        WatchReport {
            duration_s: elapsed,
            interval_s: self.opts.interval.as_secs_f64(),
            window_s: self.opts.window.as_secs_f64(),
            samples: self.samples,
            uss_source: if self.exact_uss {
                "smaps_rollup"
            } else {
                "statm"
            },
            processes: self.watched_processes(),
            exited: self.processes.values().filter(|w| w.exited).count(),
            caches: self.caches.len(),
            findings,
            notes: self.notes.clone(),
            ended_by,
            agent,
            cpu_percent,
        }
    }
}

/// Does the kernel reclaim this cache under memory pressure (`SLAB_RECLAIM_ACCOUNT`)?
fn is_reclaimable(cache: &str) -> bool {
    std::fs::read_to_string(format!("/sys/kernel/slab/{cache}/reclaim_account"))
        .is_ok_and(|v| v.trim() == "1")
}

fn fit(series: &mut Series) -> Option<Trend> {
    trend::fit(series.samples())
}

impl Watched {
    fn new(comm: String) -> Self {
        Self {
            comm,
            uss: Series::default(),
            vss: Series::default(),
            untouched: Series::default(),
            exited: false,
            seen: 0,
        }
    }

    fn push(&mut self, t: f64, uss: u64, vss: u64, window_s: f64, n: u64) {
        self.uss.push(t, uss, window_s);
        self.vss.push(t, vss, window_s);
        self.untouched.push(t, vss.saturating_sub(uss), window_s);
        self.seen = n;
    }
}

fn read_into(path: &str, buf: &mut String) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open(path)?.read_to_string(buf).map(|_| ())
}

/// Why a watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("nothing to watch: {}", describe_refused(.0))]
    NothingToWatch(Vec<(u32, Unreadable)>),
}

fn describe_refused(refused: &[(u32, Unreadable)]) -> String {
    refused
        .iter()
        .map(|(pid, r)| format!("pid {pid}: {}", r.describe()))
        .collect::<Vec<_>>()
        .join("; ")
}
