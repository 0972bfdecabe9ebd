//! Fault attribution: what one fault was (kind, access, mapping) and the aggregates the reports
//! are made from (per process, per thread, per callsite, with latency histograms).
use std::{collections::HashMap, sync::Arc};

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

/// One accounted fault, attributed.
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

/// A latency histogram in nanoseconds (HdrHistogram, 2 significant figures, auto-resizing so an
/// idle callsite costs little).
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
    fn add(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::Minor => self.minor += 1,
            FaultKind::Major => self.major += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.minor + self.major
    }
}

#[derive(Clone, Debug, Default)]
pub struct ProcessFaults {
    pub counts: Counts,
    pub latency: [Latency; 2],
    pub threads: HashMap<u32, Counts>,
    pub by_class: HashMap<MappingClass, Counts>,
    pub by_access: HashMap<(Access, Cause), u64>,
    pub kernel_mode: u64,
}

/// A callsite: where the faults came from and what they hit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallsiteKey {
    pub pid: u32,
    pub kind: FaultKind,
    pub user_stack: Option<u32>,
    pub kernel_stack: Option<u32>,
    pub class: MappingClass,
    pub path: Option<Arc<str>>,
}

#[derive(Clone, Debug, Default)]
pub struct CallsiteFaults {
    pub count: u64,
    pub latency: Latency,
    pub by_access: HashMap<(Access, Cause), u64>,
}

/// Everything attributed so far.
#[derive(Clone, Debug, Default)]
pub struct FaultAggregate {
    pub processes: HashMap<u32, ProcessFaults>,
    pub callsites: HashMap<CallsiteKey, CallsiteFaults>,
}

impl FaultAggregate {
    pub fn record(&mut self, f: &Fault) {
        let p = self.processes.entry(f.pid).or_default();
        p.counts.add(f.kind);
        p.threads.entry(f.tid).or_default().add(f.kind);
        p.by_class.entry(f.class).or_default().add(f.kind);
        *p.by_access.entry((f.access, f.cause)).or_default() += 1;
        if f.kernel_mode {
            p.kernel_mode += 1;
        }
        if let Some(ns) = f.latency_ns {
            p.latency[f.kind as usize].record(ns);
        }
        let key = CallsiteKey {
            pid: f.pid,
            kind: f.kind,
            user_stack: f.user_stack,
            kernel_stack: f.kernel_stack,
            class: f.class,
            path: f.path.clone(),
        };
        let c = self.callsites.entry(key).or_default();
        c.count += 1;
        if let Some(ns) = f.latency_ns {
            c.latency.record(ns);
        }
        *c.by_access.entry((f.access, f.cause)).or_default() += 1;
    }

    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        for p in self.processes.values() {
            t.minor += p.counts.minor;
            t.major += p.counts.major;
        }
        t
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
    fn threads_and_callsites_add_up_to_the_process() {
        let mut agg = FaultAggregate::default();
        for i in 0..100u64 {
            let kind = if i % 10 == 0 {
                FaultKind::Major
            } else {
                FaultKind::Minor
            };
            agg.record(&fault(
                7,
                7 + (i % 3) as u32,
                kind,
                1000 + i,
                (i % 4) as u32,
            ));
        }
        agg.record(&fault(8, 8, FaultKind::Minor, 5, 0));
        let p = &agg.processes[&7];
        assert_eq!(
            p.counts,
            Counts {
                minor: 90,
                major: 10
            }
        );
        let thread_sum: u64 = p.threads.values().map(Counts::total).sum();
        assert_eq!(thread_sum, 100);
        let site_sum: u64 = agg
            .callsites
            .iter()
            .filter(|(k, _)| k.pid == 7)
            .map(|(_, v)| v.count)
            .sum();
        assert_eq!(site_sum, 100);
        assert_eq!(
            agg.total(),
            Counts {
                minor: 91,
                major: 10
            }
        );
        let lat = p.latency[FaultKind::Major as usize].summary();
        assert_eq!(lat.count, 10);
        assert!(lat.p50 >= 1000 && lat.max <= 1100, "{lat:?}");
    }
}
