//! `memtrace vma`'s report: callsites by what they still hold mapped, as a table, JSON or
//! folded stacks.
use std::{collections::HashMap, fmt::Write as _, time::Instant};

use serde::Serialize;

use super::ledger::Calls;
use crate::{
    addrspace::MappingClass,
    collector::VmaLedger,
    loader::KernelCounters,
    report::{AgentStats, Format, Loss, LostReport, SYMBOLIZE_UNTIL_FINAL},
    symbolize::{Frame, Symbolizer},
    units::{human_age, human_bytes},
};

#[derive(Clone, Debug, Serialize)]
pub struct VmaCallsite {
    pub pid: u32,
    pub comm: String,
    /// The process has exited: the bytes are what it held at exit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exited: bool,
    pub kind: MappingClass,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub outstanding_bytes: u64,
    pub outstanding_regions: u64,
    pub mapped_bytes: u64,
    pub unmapped_bytes: u64,
    /// Mapping calls (mmap, brk growth).
    pub mappings: u64,
    /// Age of its oldest mapping still held (at exit, for an exited process).
    pub max_age_ms: u64,
    /// With --faults: pages of its mappings first touched (the RSS it caused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub touched_bytes: Option<u64>,
    /// The caller's user stack, innermost first.
    pub frames: Vec<Frame>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VmaTotals {
    pub outstanding_bytes: u64,
    pub outstanding_regions: u64,
    pub mapped_bytes: u64,
    pub unmapped_bytes: u64,
    /// Unmapped memory that was mapped before tracing began.
    pub unmapped_untracked_bytes: u64,
    pub calls: Calls,
    pub callsites: usize,
    /// System-wide, exited processes' rows go (their memory went with them); their figures
    /// stay in these totals.
    pub exited_processes_dropped_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmaReport {
    pub duration_s: f64,
    /// --faults: touched pages were counted.
    pub faults: bool,
    pub totals: VmaTotals,
    /// Callsites before --top cut the list.
    pub callsites_total: usize,
    pub callsites: Vec<VmaCallsite>,
    pub lost: LostReport,
    pub agent: AgentStats,
}

pub struct VmaReportInput<'a> {
    pub vma: &'a VmaLedger,
    pub comms: &'a dyn Fn(u32) -> Option<String>,
    pub counters: KernelCounters,
    pub sideband_lost: u64,
    pub undecodable: u64,
    pub records: u64,
    pub duration_s: f64,
    pub now_ns: u64,
    pub top: usize,
    pub faults: bool,
}

pub fn build(input: &VmaReportInput<'_>, symbolizer: &mut Symbolizer) -> VmaReport {
    let ledger = &input.vma.ledger;
    let oldest = ledger.oldest_outstanding();
    let exit_times = ledger.exit_times();
    let mut totals = VmaTotals {
        unmapped_untracked_bytes: ledger.unmapped_untracked,
        calls: ledger.calls,
        exited_processes_dropped_bytes: ledger.dropped.mapped_bytes,
        ..VmaTotals::default()
    };
    let mut rows: Vec<(u32, &super::SiteKey, &super::SiteStats)> = Vec::new();
    for (id, key, stats) in ledger.sites() {
        totals.outstanding_bytes += stats.outstanding_bytes();
        totals.outstanding_regions += stats.outstanding_regions;
        totals.mapped_bytes += stats.mapped_bytes;
        totals.unmapped_bytes += stats.unmapped_bytes;
        rows.push((id, key, stats));
    }
    totals.mapped_bytes += ledger.dropped.mapped_bytes;
    totals.unmapped_bytes += ledger.dropped.unmapped_bytes;
    totals.callsites = rows.len();
    rows.sort_by(|a, b| {
        (b.2.outstanding_bytes(), b.2.mapped_bytes)
            .cmp(&(a.2.outstanding_bytes(), a.2.mapped_bytes))
            .then(a.0.cmp(&b.0))
    });
    let callsites_total = rows.len();
    let shown = if input.top == 0 {
        rows.len()
    } else {
        input.top.min(rows.len())
    };
    let rows = &rows[..shown];
    symbolizer.begin_report();
    let stacks: Vec<_> = rows
        .iter()
        .map(|(_, key, stats)| {
            key.stack.map(|id| {
                let stack = input.vma.stacks.get(id);
                symbolizer.want_user(&stack, stats.mapped_bytes >> 12);
                stack
            })
        })
        .collect();
    symbolizer.symbolize_wanted(Some(Instant::now() + SYMBOLIZE_UNTIL_FINAL));
    let mut comm_cache: HashMap<u32, String> = HashMap::new();
    let callsites = rows
        .iter()
        .zip(stacks)
        .map(|((id, key, stats), stack)| {
            let exit = exit_times.get(&key.pid).copied();
            let until = exit.unwrap_or(input.now_ns);
            let max_age_ms = oldest
                .get(id)
                .map_or(0, |&created| until.saturating_sub(created) / 1_000_000);
            let comm = comm_cache
                .entry(key.pid)
                .or_insert_with(|| (input.comms)(key.pid).unwrap_or_else(|| "?".into()))
                .clone();
            VmaCallsite {
                pid: key.pid,
                comm,
                exited: exit.is_some(),
                kind: key.class,
                path: key.path.as_deref().map(str::to_string),
                outstanding_bytes: stats.outstanding_bytes(),
                outstanding_regions: stats.outstanding_regions,
                mapped_bytes: stats.mapped_bytes,
                unmapped_bytes: stats.unmapped_bytes,
                mappings: stats.mappings,
                max_age_ms,
                touched_bytes: input.faults.then_some(stats.touched_pages * 4096),
                truncated: stack.as_ref().is_some_and(|s| s.truncated),
                frames: stack
                    .map(|s| symbolizer.user_frames(&s))
                    .unwrap_or_default(),
            }
        })
        .collect();
    symbolizer.finish();
    let c = &input.counters;
    let causes = vec![
        Loss::new(
            "ringbuf_full",
            c.ringbuf_full_other,
            "ring buffer full: mmap/munmap/brk records dropped (bytes are off by what they held)",
        ),
        Loss::new(
            "syscall_map_full",
            c.syscall_pending_full,
            "pending-syscall map full: calls missed",
        ),
        Loss::new(
            "syscall_args_unread",
            c.syscall_args_unread,
            "saved user registers not found: calls missed",
        ),
        Loss::new(
            "user_stack_empty",
            c.user_stack_lost,
            "user stack walk found no frame: counted without a callsite",
        ),
        Loss::new(
            "stack_unresolved",
            input.vma.stack_unresolved,
            "call reused a stack walk whose record was dropped: counted without a callsite",
        ),
        Loss::new(
            "stack_table_full",
            input.vma.stacks_full,
            "stack table full: counted without a callsite",
        ),
        Loss::new(
            "sideband_lost",
            input.sideband_lost,
            "perf side-band records dropped: file paths may be unknown",
        ),
        Loss::new("undecodable", input.undecodable, "undecodable records"),
    ];
    let events = c.ringbuf_full_other + c.syscall_pending_full + c.syscall_args_unread;
    VmaReport {
        duration_s: input.duration_s,
        faults: input.faults,
        totals,
        callsites_total,
        callsites,
        lost: LostReport {
            events,
            causes: causes.into_iter().filter(|l| l.count > 0).collect(),
        },
        agent: AgentStats::current(input.records),
    }
}

fn frames_line(c: &VmaCallsite) -> String {
    if c.frames.is_empty() {
        return "[no stack]".into();
    }
    let mut s: Vec<String> = c.frames.iter().take(5).map(|f| f.display()).collect();
    if c.frames.len() > 5 {
        s.push("…".into());
    }
    s.join(" <- ")
}

/// The table, or folded stacks (`comm;outermost;...;innermost;kind outstanding_bytes`).
pub fn render(r: &VmaReport, format: Format) -> String {
    let mut out = String::new();
    if format == Format::Folded {
        for c in &r.callsites {
            if c.outstanding_bytes == 0 {
                continue;
            }
            let mut parts = vec![c.comm.replace(';', "_")];
            parts.extend(c.frames.iter().rev().map(|f| f.function.replace(';', "_")));
            parts.push(format!("[{}]", c.kind));
            let _ = writeln!(out, "{} {}", parts.join(";"), c.outstanding_bytes);
        }
        return out;
    }
    let t = &r.totals;
    let _ = writeln!(
        out,
        "memtrace vma: {} outstanding in {} regions; mapped {}, unmapped {} in {:.1}s \
         ({} mmap, {} munmap, {} mremap, {} brk)",
        human_bytes(t.outstanding_bytes),
        t.outstanding_regions,
        human_bytes(t.mapped_bytes),
        human_bytes(t.unmapped_bytes),
        r.duration_s,
        t.calls.mmap,
        t.calls.munmap,
        t.calls.mremap,
        t.calls.brk
    );
    if t.unmapped_untracked_bytes > 0 {
        let _ = writeln!(
            out,
            "  and {} unmapped that was mapped before tracing began",
            human_bytes(t.unmapped_untracked_bytes)
        );
    }
    let _ = writeln!(out);
    let touched = if r.faults { "  TOUCHED" } else { "" };
    let _ = writeln!(
        out,
        "{:>11} {:>7} {:>10} {:>10} {:>8}{touched} {:>8} {:<15} {:<13} CALLSITE",
        "OUTSTANDING", "REGIONS", "MAPPED", "UNMAPPED", "MAX AGE", "PID", "COMM", "KIND"
    );
    for c in &r.callsites {
        let touched = match c.touched_bytes {
            Some(b) => format!(" {:>8}", human_bytes(b)),
            None => String::new(),
        };
        let kind = match &c.path {
            Some(p) => format!("{} {}", c.kind, p.rsplit('/').next().unwrap_or(p)),
            None => c.kind.to_string(),
        };
        let comm = if c.exited {
            format!("{}†", c.comm)
        } else {
            c.comm.clone()
        };
        let _ = writeln!(
            out,
            "{:>11} {:>7} {:>10} {:>10} {:>8}{touched} {:>8} {:<15} {:<13} {}",
            human_bytes(c.outstanding_bytes),
            c.outstanding_regions,
            human_bytes(c.mapped_bytes),
            human_bytes(c.unmapped_bytes),
            human_age(c.max_age_ms),
            c.pid,
            comm,
            kind,
            frames_line(c)
        );
    }
    if r.callsites_total > r.callsites.len() {
        let _ = writeln!(
            out,
            "({} more callsites; --top 0 shows all)",
            r.callsites_total - r.callsites.len()
        );
    }
    if r.callsites.iter().any(|c| c.exited) {
        let _ = writeln!(out, "† exited: what it held mapped at exit");
    }
    let _ = write!(out, "lost: {}", r.lost.events);
    for l in &r.lost.causes {
        let _ = write!(out, "; {} {} ({})", l.id, l.count, l.description);
    }
    let _ = writeln!(out);
    out
}
