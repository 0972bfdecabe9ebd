//! `memtrace vma`'s report: callsites by what they still hold mapped, as a table, JSON or
//! folded stacks.
use std::{collections::HashMap, fmt::Write as _, time::Instant};

use serde::Serialize;

use super::{
    ledger::{Calls, Ledger},
    SiteKey, SiteStats,
};
use crate::{
    addrspace::MappingClass,
    collector::VmaLedger,
    loader::KernelCounters,
    report::{AgentStats, Format, Loss, LostReport, Scope, SYMBOLIZE_UNTIL_FINAL},
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
    /// `interval`: mapped and unmapped bytes, mappings, touched bytes and calls cover the time
    /// since the previous report; outstanding bytes, regions and ages are always the state now.
    pub scope: Scope,
    pub duration_s: f64,
    pub covers_s: f64,
    /// --faults: touched pages were counted.
    pub faults: bool,
    pub totals: VmaTotals,
    /// Callsites before --top cut the list.
    pub callsites_total: usize,
    pub callsites: Vec<VmaCallsite>,
    pub lost: LostReport,
    pub agent: AgentStats,
}

/// What the previous interval report counted, so the next shows what came since.
#[derive(Debug, Default)]
pub struct IntervalBase {
    sites: HashMap<u32, SiteStats>,
    calls: Calls,
    untracked: u64,
    dropped: SiteStats,
}

impl IntervalBase {
    /// The ledger's counts now.
    pub fn of(ledger: &Ledger) -> Self {
        Self {
            sites: ledger.sites().map(|(id, _, s)| (id, s.clone())).collect(),
            calls: ledger.calls,
            untracked: ledger.unmapped_untracked,
            dropped: ledger.dropped.clone(),
        }
    }
}

/// `now` less what `base` had counted of the same callsite.
fn since(now: &SiteStats, base: Option<&SiteStats>) -> SiteStats {
    let Some(b) = base else {
        return now.clone();
    };
    SiteStats {
        mapped_bytes: now.mapped_bytes.saturating_sub(b.mapped_bytes),
        unmapped_bytes: now.unmapped_bytes.saturating_sub(b.unmapped_bytes),
        mappings: now.mappings.saturating_sub(b.mappings),
        outstanding_regions: now.outstanding_regions,
        touched_pages: now.touched_pages.saturating_sub(b.touched_pages),
    }
}

pub struct VmaReportInput<'a> {
    pub vma: &'a VmaLedger,
    /// For an interval report: the counts of the previous one.
    pub since: Option<&'a IntervalBase>,
    pub covers_s: f64,
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
    let base = input.since;
    let calls = match base {
        Some(b) => Calls {
            mmap: ledger.calls.mmap - b.calls.mmap,
            munmap: ledger.calls.munmap - b.calls.munmap,
            mremap: ledger.calls.mremap - b.calls.mremap,
            brk: ledger.calls.brk - b.calls.brk,
        },
        None => ledger.calls,
    };
    let mut dropped = since(&ledger.dropped, base.map(|b| &b.dropped));
    // A callsite dropped during the interval (its process exited, system-wide) brought its
    // whole history into `dropped`; what the previous report already counted of it is not
    // this interval's.
    if let Some(b) = base {
        for (&id, before) in &b.sites {
            if ledger.site_stats(id).is_none() {
                dropped.mapped_bytes = dropped.mapped_bytes.saturating_sub(before.mapped_bytes);
                dropped.unmapped_bytes =
                    dropped.unmapped_bytes.saturating_sub(before.unmapped_bytes);
            }
        }
    }
    let mut totals = VmaTotals {
        unmapped_untracked_bytes: ledger.unmapped_untracked - base.map_or(0, |b| b.untracked),
        calls,
        exited_processes_dropped_bytes: dropped.mapped_bytes,
        ..VmaTotals::default()
    };
    // Outstanding bytes are the state now; the rest is what the report covers.
    let mut rows: Vec<(u32, &SiteKey, u64, SiteStats)> = Vec::new();
    for (id, key, stats) in ledger.sites() {
        let outstanding = stats.outstanding_bytes();
        let covered = since(stats, base.and_then(|b| b.sites.get(&id)));
        totals.outstanding_bytes += outstanding;
        totals.outstanding_regions += stats.outstanding_regions;
        totals.mapped_bytes += covered.mapped_bytes;
        totals.unmapped_bytes += covered.unmapped_bytes;
        // An interval report leaves out callsites that neither hold nor did anything.
        if outstanding > 0 || covered.mapped_bytes > 0 || covered.unmapped_bytes > 0 {
            rows.push((id, key, outstanding, covered));
        }
    }
    totals.mapped_bytes += dropped.mapped_bytes;
    totals.unmapped_bytes += dropped.unmapped_bytes;
    totals.callsites = rows.len();
    rows.sort_by(|a, b| {
        (b.2, b.3.mapped_bytes)
            .cmp(&(a.2, a.3.mapped_bytes))
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
        .map(|(_, key, _, stats)| {
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
        .map(|((id, key, outstanding, stats), stack)| {
            let exit = exit_times.get(&key.pid).copied();
            let until = exit.unwrap_or(input.now_ns);
            let max_age_ms = oldest
                .get(id)
                .filter(|_| *outstanding > 0)
                .map_or(0, |&created| until.saturating_sub(created) / 1_000_000);
            let comm = comm_cache
                .entry(key.pid)
                .or_insert_with(|| (input.comms)(key.pid).unwrap_or_else(|| "?".into()))
                .clone();
            let frames = stack
                .as_ref()
                .map(|s| symbolizer.user_frames(s))
                .unwrap_or_default();
            // A walk that stops short of the thread's entry (code without frame pointers, as
            // glibc's malloc) is cut: the frames are the innermost ones only.
            let reaches_entry = frames
                .last()
                .is_some_and(|f| crate::analysis::slab::is_thread_entry(&f.function));
            VmaCallsite {
                pid: key.pid,
                comm,
                exited: exit.is_some(),
                kind: key.class,
                path: key.path.as_deref().map(str::to_string),
                outstanding_bytes: *outstanding,
                outstanding_regions: stats.outstanding_regions,
                mapped_bytes: stats.mapped_bytes,
                unmapped_bytes: stats.unmapped_bytes,
                mappings: stats.mappings,
                max_age_ms,
                touched_bytes: input.faults.then_some(stats.touched_pages * 4096),
                truncated: stack.as_ref().is_some_and(|s| s.truncated)
                    || (!frames.is_empty() && !reaches_entry),
                frames,
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
        scope: if base.is_some() {
            Scope::Interval
        } else {
            Scope::Total
        },
        duration_s: input.duration_s,
        covers_s: input.covers_s,
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

/// Is this frame in the C library or the dynamic loader (syscall wrappers, malloc)?
fn in_libc(f: &Frame) -> bool {
    let file = f.module.rsplit('/').next().unwrap_or(&f.module);
    file.starts_with("libc.so") || file.starts_with("ld-linux")
}

/// The callsite column: the program's own frames, from the first one past libc's wrappers and
/// malloc (`libc:` and how many were left out before them); JSON has every frame.
fn frames_line(c: &VmaCallsite) -> String {
    if c.frames.is_empty() {
        return "[no stack]".into();
    }
    let skip = c.frames.iter().take_while(|f| in_libc(f)).count();
    // All in libc (a stack cut inside it): show those.
    let skip = if skip == c.frames.len() { 0 } else { skip };
    let shown = &c.frames[skip..];
    let mut s: Vec<String> = Vec::new();
    if skip > 0 {
        let last = &c.frames[skip - 1];
        s.push(format!("[libc: {} <- {skip} frames]", last.function));
    }
    s.extend(
        shown
            .iter()
            .filter(|f| !f.inlined)
            .take(5)
            .map(Frame::display),
    );
    if shown.iter().filter(|f| !f.inlined).count() > 5 {
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
    let what = match r.scope {
        Scope::Interval => format!("the {:.1}s interval", r.covers_s),
        Scope::Total => format!("{:.1}s", r.duration_s),
    };
    let _ = writeln!(
        out,
        "memtrace vma: {} outstanding in {} regions; mapped {}, unmapped {} in {what} \
         ({} mmap, {} munmap, {} mremap, {} brk)",
        human_bytes(t.outstanding_bytes),
        t.outstanding_regions,
        human_bytes(t.mapped_bytes),
        human_bytes(t.unmapped_bytes),
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
    if r.callsites.is_empty() {
        let _ = writeln!(out, "no mapping calls traced");
    }
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
        // Cut to the column, the exited mark inside it.
        let mut comm: String = c
            .comm
            .chars()
            .take(if c.exited { 14 } else { 15 })
            .collect();
        if c.exited {
            comm.push('†');
        }
        let _ = writeln!(
            out,
            "{:>11} {:>7} {:>10} {:>10} {:>8}{touched} {:>8} {:<15} {:<13} {}{}",
            human_bytes(c.outstanding_bytes),
            c.outstanding_regions,
            human_bytes(c.mapped_bytes),
            human_bytes(c.unmapped_bytes),
            human_age(c.max_age_ms),
            c.pid,
            comm,
            kind,
            frames_line(c),
            if c.truncated { " [cut]" } else { "" }
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
    if r.callsites.iter().any(|c| c.truncated) {
        let _ = writeln!(
            out,
            "[cut]: the stack walk stopped in code without frame pointers (glibc's malloc is): \
             the frames shown are the innermost"
        );
    }
    let _ = write!(out, "lost: {}", r.lost.events);
    for l in &r.lost.causes {
        let _ = write!(out, "; {} {} ({})", l.id, l.count, l.description);
    }
    let _ = writeln!(out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(vma: &VmaLedger, since: Option<&IntervalBase>) -> VmaReport {
        let comms = |_pid: u32| Some("t".to_string());
        let input = VmaReportInput {
            vma,
            since,
            covers_s: 1.0,
            comms: &comms,
            counters: KernelCounters::default(),
            sideband_lost: 0,
            undecodable: 0,
            records: 0,
            duration_s: 1.0,
            now_ns: 1_000_000_000,
            top: 10,
            faults: false,
        };
        build(&input, &mut Symbolizer::new())
    }

    #[test]
    fn interval_reports_count_each_byte_once() {
        // System-wide: an exited process's rows go into the dropped totals.
        let mut vma = VmaLedger::new(false);
        let key = SiteKey {
            pid: 7,
            class: MappingClass::AnonPrivate,
            path: None,
            stack: None,
        };
        let site = vma.ledger.site(key);
        vma.ledger.mmap(7, 0x10000, 8192, site, 0);
        let first = report(&vma, Some(&IntervalBase::default()));
        assert_eq!(first.scope, Scope::Interval);
        assert_eq!(first.totals.mapped_bytes, 8192);
        assert_eq!(first.totals.outstanding_bytes, 8192);
        let base = IntervalBase::of(&vma.ledger);
        // Maps 4 KiB more, then exits: the interval mapped 4 KiB, not 12.
        vma.ledger.mmap(7, 0x20000, 4096, site, 1);
        vma.ledger.exited(7, 2);
        let second = report(&vma, Some(&base));
        assert_eq!(second.totals.mapped_bytes, 4096);
        assert_eq!(second.totals.outstanding_bytes, 0);
        assert!(second.callsites.is_empty());
        // The final report has the whole run.
        assert_eq!(report(&vma, None).totals.mapped_bytes, 12288);
    }
}
