//! Fault attribution: what one fault was (kind, access, mapping) and the aggregates the reports
//! are made from (per process, per thread, per callsite, with latency histograms).
use foldhash::HashMap;
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::addrspace::MappingClass;

/// Major (needed I/O) or minor (served from memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Minor,
    Major,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minor => "minor",
            Self::Major => "major",
        }
    }
}

/// What the faulting access was, from the x86 page-fault error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    Exec,
    /// The fault's entry tracepoint was not seen, so the error code is unknown.
    Unknown,
}

/// Why the page was not usable: absent, or present but not permitted (copy-on-write).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    NotPresent,
    Protection,
    Unknown,
}

/// x86 `X86_PF_*` error-code bits.
mod pf {
    pub const PROT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const INSTR: u64 = 1 << 4;
}

/// Decodes an x86 page-fault error code into access type and cause.
pub fn decode_error_code(error_code: Option<u64>) -> (Access, Cause) {
    let Some(code) = error_code else {
        return (Access::Unknown, Cause::Unknown);
    };
    let access = if code & pf::INSTR != 0 {
        Access::Exec
    } else if code & pf::WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let cause = if code & pf::PROT != 0 {
        Cause::Protection
    } else {
        Cause::NotPresent
    };
    (access, cause)
}

/// One accounted fault, attributed. Stacks are indices: `user_stack` into the process's own
/// [`crate::stacks::StackTable`], `kernel_stack` into the collector's kernel stack table.
#[derive(Clone, Debug)]
pub struct Fault {
    pub pid: u32,
    pub tid: u32,
    pub kind: FaultKind,
    pub kernel_mode: bool,
    pub address: u64,
    pub latency_ns: Option<u64>,
    pub access: Access,
    pub cause: Cause,
    pub user_stack: Option<u32>,
    pub kernel_stack: Option<u32>,
    pub class: MappingClass,
    pub path: Option<Arc<str>>,
}

/// A latency histogram in nanoseconds (HdrHistogram, 2 significant figures, auto-resizing),
/// for per-process figures.
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // 2 significant figures is ample for fault latencies; auto-resize keeps it small.
        Self(Histogram::new(2).expect("2 significant figures is a valid HdrHistogram setting"))
    }
}

impl Latency {
    pub fn record(&mut self, ns: u64) {
        // `record` grows the auto-resizing histogram; `saturating_record` would clamp instead.
        // It fails only for values beyond u64 range tracking, which a latency cannot reach.
        let _ = self.0.record(ns.max(1));
    }
    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latency) {
        // Both auto-resize, so adding cannot run out of range.
        let _ = self.0.add(&other.0);
    }
    /// Takes away the samples of `earlier`, a past state of this histogram.
    pub fn subtract(&mut self, earlier: &Latency) {
        // Fails only if `earlier` is not a past state of this one: keep the totals then.
        let _ = self.0.subtract(&earlier.0);
    }
    pub fn hist(&self) -> &Histogram<u64> {
        &self.0
    }
    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean() as u64,
        }
    }
}

/// A small latency histogram for callsites, of which a long run has hundreds of thousands:
/// log-linear buckets (8 per power of two, so a percentile is within 6.25%). Most callsites
/// fault a few times, into one bucket: that bucket is held inline; past one, buckets are
/// sorted (bucket, count) pairs packed in one word each. Tens of bytes where an HdrHistogram
/// is kilobytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactLatency {
    count: u64,
    sum: u64,
    max: u64,
    buckets: Buckets,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Buckets {
    /// Every sample (all `count` of them) fell in this bucket.
    One(u16),
    /// Sorted by bucket; empty while there is no sample. Each pair is one word (see
    /// [`pack`]): a long run holds hundreds of thousands of these lists.
    Many(Vec<u64>),
}

impl Default for Buckets {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

/// Values below this are their own bucket.
const EXACT_BELOW: u64 = 64;
const SUB_BUCKET_BITS: u32 = 3;

/// Bits of a packed pair that hold the count; the bucket is above them, so packed pairs sort
/// by bucket.
const COUNT_BITS: u32 = 48;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// A (bucket, count) pair as one word; counts past 2^48 saturate.
fn pack(bucket: u16, count: u64) -> u64 {
    (u64::from(bucket) << COUNT_BITS) | count.min(COUNT_MASK)
}

fn unpack(pair: u64) -> (u16, u64) {
    ((pair >> COUNT_BITS) as u16, pair & COUNT_MASK)
}

/// Adds `n` samples in `bucket` to sorted packed pairs.
fn add_to_bucket(pairs: &mut Vec<u64>, bucket: u16, n: u64) {
    match pairs.binary_search_by_key(&bucket, |&p| unpack(p).0) {
        Ok(i) => pairs[i] = pack(bucket, unpack(pairs[i]).1.saturating_add(n)),
        Err(i) => pairs.insert(i, pack(bucket, n)),
    }
}

impl CompactLatency {
    fn bucket(ns: u64) -> u16 {
        if ns < EXACT_BELOW {
            return ns as u16;
        }
        let exp = 63 - ns.leading_zeros(); // >= 6
        let sub = (ns >> (exp - SUB_BUCKET_BITS)) & ((1 << SUB_BUCKET_BITS) - 1);
        (EXACT_BELOW + u64::from(exp - 6) * (1 << SUB_BUCKET_BITS) + sub) as u16
    }

    /// The middle of a bucket's range.
    fn value(bucket: u16) -> u64 {
        let b = u64::from(bucket);
        if b < EXACT_BELOW {
            return b;
        }
        let i = b - EXACT_BELOW;
        let exp = (i >> SUB_BUCKET_BITS) as u32 + 6;
        let sub = i & ((1 << SUB_BUCKET_BITS) - 1);
        let width = 1u64 << (exp - SUB_BUCKET_BITS);
        ((1 << SUB_BUCKET_BITS) + sub) * width + width / 2
    }

    /// The buckets as sorted (bucket, count) pairs, turning an inline bucket into a list.
    fn pairs_mut(&mut self) -> &mut Vec<u64> {
        if let Buckets::One(b) = self.buckets {
            self.buckets = Buckets::Many(vec![pack(b, self.count)]);
        }
        match &mut self.buckets {
            Buckets::Many(pairs) => pairs,
            Buckets::One(_) => unreachable!("turned into a list just above"),
        }
    }

    /// Non-empty buckets, lowest first.
    fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        let (one, many) = match &self.buckets {
            Buckets::One(b) => (Some((*b, self.count)), &[][..]),
            Buckets::Many(pairs) => (None, &pairs[..]),
        };
        one.into_iter().chain(many.iter().map(|&p| unpack(p)))
    }

    pub fn record(&mut self, ns: u64) {
        let b = Self::bucket(ns);
        match &mut self.buckets {
            _ if self.count == 0 => self.buckets = Buckets::One(b),
            Buckets::One(one) if *one == b => {}
            Buckets::One(_) => add_to_bucket(self.pairs_mut(), b, 1),
            Buckets::Many(pairs) => add_to_bucket(pairs, b, 1),
        }
        self.count += 1;
        self.sum = self.sum.saturating_add(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &CompactLatency) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.clone_from(other);
            return;
        }
        match (&self.buckets, &other.buckets) {
            (Buckets::One(a), Buckets::One(b)) if a == b => {}
            _ => {
                let pairs = self.pairs_mut();
                for (b, n) in other.iter() {
                    add_to_bucket(pairs, b, n);
                }
            }
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    fn quantile(&self, q: f64) -> u64 {
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, n) in self.iter() {
            seen += n;
            if seen >= rank {
                return Self::value(b).min(self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.count,
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p999: self.quantile(0.999),
            max: self.max,
            mean: self.sum / self.count,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub minor: u64,
    pub major: u64,
}

impl Counts {
    pub fn add(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::Minor => self.minor += 1,
            FaultKind::Major => self.major += 1,
        }
    }
    pub fn merge(&mut self, other: &Counts) {
        self.minor += other.minor;
        self.major += other.major;
    }
    pub fn subtract(&mut self, earlier: &Counts) {
        self.minor = self.minor.saturating_sub(earlier.minor);
        self.major = self.major.saturating_sub(earlier.major);
    }
    pub fn total(&self) -> u64 {
        self.minor + self.major
    }
}

/// Faults by (access, cause): a fixed array, since there are only seven combinations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCounts([u64; 7]);

impl AccessCounts {
    const ALL: [(Access, Cause); 7] = [
        (Access::Read, Cause::NotPresent),
        (Access::Read, Cause::Protection),
        (Access::Write, Cause::NotPresent),
        (Access::Write, Cause::Protection),
        (Access::Exec, Cause::NotPresent),
        (Access::Exec, Cause::Protection),
        (Access::Unknown, Cause::Unknown),
    ];

    fn index(access: Access, cause: Cause) -> usize {
        let a = match access {
            Access::Read => 0,
            Access::Write => 2,
            Access::Exec => 4,
            Access::Unknown => return 6,
        };
        a + usize::from(cause == Cause::Protection)
    }

    pub fn add(&mut self, access: Access, cause: Cause) {
        self.0[Self::index(access, cause)] += 1;
    }

    pub fn merge(&mut self, other: &AccessCounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    pub fn subtract(&mut self, earlier: &AccessCounts) {
        for (a, b) in self.0.iter_mut().zip(earlier.0) {
            *a = a.saturating_sub(b);
        }
    }

    /// Non-zero (access, cause, count) triples.
    pub fn iter(&self) -> impl Iterator<Item = (Access, Cause, u64)> + '_ {
        Self::ALL
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(&(a, c), n)| (a, c, n))
    }
}

/// Faults by mapping class: a fixed array, as the class of every fault is counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts([Counts; 7]);

impl ClassCounts {
    const ALL: [MappingClass; 7] = [
        MappingClass::Heap,
        MappingClass::Stack,
        MappingClass::AnonPrivate,
        MappingClass::AnonShared,
        MappingClass::FilePrivate,
        MappingClass::FileShared,
        MappingClass::Other,
    ];

    fn index(class: MappingClass) -> usize {
        match class {
            MappingClass::Heap => 0,
            MappingClass::Stack => 1,
            MappingClass::AnonPrivate => 2,
            MappingClass::AnonShared => 3,
            MappingClass::FilePrivate => 4,
            MappingClass::FileShared => 5,
            MappingClass::Other => 6,
        }
    }

    pub fn add(&mut self, class: MappingClass, kind: FaultKind) {
        self.0[Self::index(class)].add(kind);
    }

    pub fn merge(&mut self, other: &ClassCounts) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a.merge(b);
        }
    }

    pub fn subtract(&mut self, earlier: &ClassCounts) {
        for (a, b) in self.0.iter_mut().zip(&earlier.0) {
            a.subtract(b);
        }
    }

    /// Classes with faults, and their counts.
    pub fn iter(&self) -> impl Iterator<Item = (MappingClass, Counts)> + '_ {
        Self::ALL
            .into_iter()
            .zip(self.0)
            .filter(|(_, c)| c.total() > 0)
    }
}

/// A process's totals. Per-thread counts are dropped when the process exits.
#[derive(Clone, Debug, Default)]
pub struct ProcessFaults {
    pub counts: Counts,
    pub latency: [Latency; 2],
    pub threads: HashMap<u32, Counts>,
    pub by_class: ClassCounts,
    pub access: AccessCounts,
    pub kernel_mode: u64,
    /// Faults the kernel counted for the process's threads with no page-fault exception of
    /// theirs: pages it faulted in on their behalf (`get_user_pages`: `MAP_POPULATE`,
    /// `mlock`, execve's argument copy, ptrace). Seen in the threads' own counters when faults
    /// are recorded at entry; not in `counts` (they have no address, stack or access type).
    pub without_exception: Counts,
}

impl ProcessFaults {
    pub fn record(&mut self, f: &Fault) {
        self.counts.add(f.kind);
        self.threads.entry(f.tid).or_default().add(f.kind);
        self.by_class.add(f.class, f.kind);
        self.access.add(f.access, f.cause);
        if f.kernel_mode {
            self.kernel_mode += 1;
        }
        if let Some(ns) = f.latency_ns {
            self.latency[f.kind as usize].record(ns);
        }
    }

    /// Adds another process's totals (threads excepted): folding exited processes by name.
    pub fn merge(&mut self, other: &ProcessFaults) {
        self.counts.merge(&other.counts);
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            a.merge(b);
        }
        self.by_class.merge(&other.by_class);
        self.access.merge(&other.access);
        self.kernel_mode += other.kernel_mode;
        self.without_exception.merge(&other.without_exception);
    }

    /// What was recorded since `earlier`, a past state of these totals.
    pub fn since(&self, earlier: &ProcessFaults) -> ProcessFaults {
        let mut d = self.clone();
        d.counts.subtract(&earlier.counts);
        for (a, b) in d.latency.iter_mut().zip(&earlier.latency) {
            a.subtract(b);
        }
        for (tid, c) in &earlier.threads {
            if let Some(t) = d.threads.get_mut(tid) {
                t.subtract(c);
            }
        }
        d.threads.retain(|_, c| c.total() > 0);
        d.by_class.subtract(&earlier.by_class);
        d.access.subtract(&earlier.access);
        d.kernel_mode = d.kernel_mode.saturating_sub(earlier.kernel_mode);
        d.without_exception.subtract(&earlier.without_exception);
        d
    }
}

/// A callsite within one process: where the faults came from and what they hit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallsiteKey {
    pub kind: FaultKind,
    pub user_stack: Option<u32>,
    pub kernel_stack: Option<u32>,
    pub class: MappingClass,
    pub path: Option<Arc<str>>,
}

impl CallsiteKey {
    pub fn of(f: &Fault) -> Self {
        Self {
            kind: f.kind,
            user_stack: f.user_stack,
            kernel_stack: f.kernel_stack,
            class: f.class,
            path: f.path.clone(),
        }
    }
}

/// Faults by (access, cause) of one callsite. Nearly every callsite sees one kind of access
/// only, held inline; the full table is boxed past that.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SiteAccess {
    /// Every fault of the callsite (all `count` of them, maybe none) had this (access, cause)
    /// index.
    One(u8),
    Many(Box<AccessCounts>),
}

impl Default for SiteAccess {
    fn default() -> Self {
        Self::One(0)
    }
}

/// What one callsite's faults were: how many, how long they took, what kind of access.
#[derive(Clone, Debug, Default)]
pub struct SiteStats {
    pub count: u64,
    pub latency: CompactLatency,
    access: SiteAccess,
}

impl SiteStats {
    pub fn record(&mut self, f: &Fault) {
        if let Some(ns) = f.latency_ns {
            self.latency.record(ns);
        }
        let index = AccessCounts::index(f.access, f.cause);
        match &mut self.access {
            SiteAccess::Many(counts) => counts.0[index] += 1,
            SiteAccess::One(seen) if self.count == 0 || usize::from(*seen) == index => {
                *seen = index as u8
            }
            SiteAccess::One(_) => {
                let mut counts = self.access_counts();
                counts.0[index] += 1;
                self.access = SiteAccess::Many(Box::new(counts));
            }
        }
        self.count += 1;
    }

    pub fn merge(&mut self, other: &SiteStats) {
        match (&self.access, &other.access) {
            _ if other.count == 0 => {}
            _ if self.count == 0 => self.access = other.access.clone(),
            (SiteAccess::One(a), SiteAccess::One(b)) if a == b => {}
            _ => {
                let mut counts = self.access_counts();
                counts.merge(&other.access_counts());
                self.access = SiteAccess::Many(Box::new(counts));
            }
        }
        self.count += other.count;
        self.latency.merge(&other.latency);
    }

    /// Faults by (access, cause).
    pub fn access_counts(&self) -> AccessCounts {
        match &self.access {
            SiteAccess::One(index) => {
                let mut counts = AccessCounts::default();
                counts.0[usize::from(*index)] = self.count;
                counts
            }
            SiteAccess::Many(counts) => **counts,
        }
    }
}

/// A callsite's faults over the run, and with interval reports those since the last one.
#[derive(Clone, Debug, Default)]
pub struct CallsiteFaults {
    pub total: SiteStats,
    /// Since the last interval report; only with interval reports, and only for callsites
    /// that faulted since (so an interval costs memory in proportion to what it saw).
    pub interval: Option<Box<SiteStats>>,
}

impl CallsiteFaults {
    pub fn record(&mut self, f: &Fault, intervals: bool) {
        self.total.record(f);
        if intervals {
            self.interval.get_or_insert_default().record(f);
        }
    }

    pub fn merge(&mut self, other: &CallsiteFaults) {
        self.total.merge(&other.total);
        if let Some(since) = &other.interval {
            self.interval.get_or_insert_default().merge(since);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(pid: u32, tid: u32, kind: FaultKind, lat: u64, stack: u32) -> Fault {
        let (access, cause) = decode_error_code(Some(0x6));
        Fault {
            pid,
            tid,
            kind,
            kernel_mode: false,
            address: 0x1000,
            latency_ns: Some(lat),
            access,
            cause,
            user_stack: Some(stack),
            kernel_stack: None,
            class: MappingClass::Heap,
            path: None,
        }
    }

    #[test]
    fn decodes_error_codes() {
        assert_eq!(
            decode_error_code(Some(0x4)),
            (Access::Read, Cause::NotPresent)
        );
        assert_eq!(
            decode_error_code(Some(0x6)),
            (Access::Write, Cause::NotPresent)
        );
        assert_eq!(
            decode_error_code(Some(0x7)),
            (Access::Write, Cause::Protection)
        );
        assert_eq!(
            decode_error_code(Some(0x15)),
            (Access::Exec, Cause::Protection)
        );
        assert_eq!(decode_error_code(None), (Access::Unknown, Cause::Unknown));
    }

    #[test]
    fn process_totals_add_up_and_merge() {
        let mut p = ProcessFaults::default();
        for i in 0..100u64 {
            let kind = if i % 10 == 0 {
                FaultKind::Major
            } else {
                FaultKind::Minor
            };
            p.record(&fault(
                7,
                7 + (i % 3) as u32,
                kind,
                1000 + i,
                (i % 4) as u32,
            ));
        }
        assert_eq!(
            p.counts,
            Counts {
                minor: 90,
                major: 10
            }
        );
        let thread_sum: u64 = p.threads.values().map(Counts::total).sum();
        assert_eq!(thread_sum, 100);
        let lat = p.latency[FaultKind::Major as usize].summary();
        assert_eq!(lat.count, 10);
        assert!(lat.p50 >= 1000 && lat.max <= 1100, "{lat:?}");
        let mut folded = ProcessFaults::default();
        folded.merge(&p);
        folded.merge(&p);
        assert_eq!(folded.counts.total(), 200);
        assert_eq!(folded.access.iter().map(|(_, _, n)| n).sum::<u64>(), 200);
        assert!(
            folded.threads.is_empty(),
            "threads are not kept when folding"
        );
    }

    #[test]
    fn callsite_stats_stay_inline_until_they_differ_and_merge_exactly() {
        let with = |access, cause, ns| Fault {
            access,
            cause,
            latency_ns: Some(ns),
            ..fault(1, 1, FaultKind::Minor, ns, 0)
        };
        let (read, write) = (
            with(Access::Read, Cause::NotPresent, 1_000),
            with(Access::Write, Cause::Protection, 50_000),
        );
        let mut one = SiteStats::default();
        for _ in 0..3 {
            one.record(&read);
        }
        assert!(matches!(one.access, SiteAccess::One(_)));
        assert!(matches!(one.latency.buckets, Buckets::One(_)));
        let mut mixed = one.clone();
        mixed.record(&write);
        let counts: Vec<_> = mixed.access_counts().iter().collect();
        assert_eq!(
            counts,
            [
                (Access::Read, Cause::NotPresent, 3),
                (Access::Write, Cause::Protection, 1)
            ]
        );
        assert_eq!(mixed.latency.iter().map(|(_, n)| n).sum::<u64>(), 4);
        assert_eq!(mixed.latency.summary().max, 50_000);
        // Merging inline stats of another access equals recording them all in one.
        let mut other = SiteStats::default();
        other.record(&write);
        let mut merged = one.clone();
        merged.merge(&other);
        assert_eq!(merged.count, 4);
        assert_eq!(merged.access_counts(), mixed.access_counts());
        assert_eq!(merged.latency, mixed.latency);
        // Into empty stats: a copy.
        let mut empty = SiteStats::default();
        empty.merge(&one);
        assert_eq!(empty.access_counts(), one.access_counts());
        assert_eq!(empty.latency, one.latency);
        // The interval part only counts once intervals are on.
        let mut site = CallsiteFaults::default();
        site.record(&read, false);
        assert!(site.interval.is_none());
        site.record(&write, true);
        assert_eq!(
            (site.total.count, site.interval.as_ref().map(|i| i.count)),
            (2, Some(1))
        );
    }

    #[test]
    fn compact_latency_percentiles_are_within_a_bucket() {
        let mut c = CompactLatency::default();
        let mut values: Vec<u64> = (0..10_000u64).map(|i| 500 + (i * 7919) % 100_000).collect();
        for &v in &values {
            c.record(v);
        }
        values.sort_unstable();
        let s = c.summary();
        for (q, got) in [(0.5, s.p50), (0.9, s.p90), (0.99, s.p99)] {
            let exact = values[(q * values.len() as f64) as usize - 1] as f64;
            assert!(
                (got as f64 - exact).abs() <= exact * 0.0625,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!((s.count, s.max), (10_000, *values.last().unwrap()));
        assert!(
            c.iter().count() < 100,
            "sparse: {} buckets",
            c.iter().count()
        );
        // Merging two halves equals recording everything in one.
        let (mut a, mut b) = (CompactLatency::default(), CompactLatency::default());
        for (i, &v) in values.iter().enumerate() {
            if i % 2 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
        }
        a.merge(&b);
        assert_eq!(a.summary(), c.summary());
        for v in [0, 1, 63, 64, 65, 1000, 1 << 40] {
            let mid = CompactLatency::value(CompactLatency::bucket(v));
            assert!(
                (mid as f64 - v as f64).abs() <= v as f64 * 0.0625 + 1.0,
                "{v} -> {mid}"
            );
        }
    }
}
