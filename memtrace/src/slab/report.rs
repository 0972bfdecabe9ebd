//! What a slab report holds, and how it reads as a table or folded stacks.
use std::fmt::Write as _;

use serde::Serialize;

use super::{GroupBy, AGE_BUCKETS_MS};
use crate::{
    report::{AgentStats, Format, LostReport, Scope},
    units::{human_age, human_bytes},
};

#[derive(Clone, Debug, Serialize)]
pub struct SlabReport {
    pub scope: Scope,
    /// Since tracing started.
    pub duration_s: f64,
    /// What allocation and free counts cover: the interval, or the whole run.
    pub covers_s: f64,
    pub by: GroupBy,
    /// Pages, per-CPU or vmalloc memory is tracked too.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub other_memory: bool,
    /// Objects younger than this are left out of `groups` (`--min-age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_age_ms: Option<u64>,
    /// Groups before `--top` cut the list.
    pub groups_total: usize,
    /// Interval reports: sorted by growth since the previous report, then by bytes. The
    /// final report: by bytes.
    pub groups: Vec<GroupReport>,
    /// Caches holding outstanding objects, by bytes, with the kernel's slabinfo beside them.
    pub caches: Vec<CacheReport>,
    pub totals: Totals,
    pub lost: LostReport,
    /// Why the slabinfo columns are empty, when they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slabinfo_unavailable: Option<String>,
    pub agent: AgentStats,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    /// `function+0xoff` of the allocating call site, when the group has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callsite: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Other names merged into the cache (`UNIX` for `signal_cache` here): the objects may be
    /// any of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache_aliases: Vec<String>,
    /// The cache is a kmalloc size class inferred from the size and gfp flags.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cache_inferred: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Outstanding objects (old enough for `--min-age`).
    pub objects: u64,
    pub bytes: u64,
    /// Bytes the callers asked for (kmalloc rounds up to its size class).
    pub requested_bytes: u64,
    pub max_age_ms: u64,
    /// Change since the previous report (since the start for the first) of the group's
    /// objects at least a second old: objects in flight (RCU grace periods, requests in
    /// progress) are not growth.
    pub growth_objects: i64,
    /// Allocations and frees in what the report covers (by callsite and by cache only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frees: Option<u64>,
    pub age_histogram: Vec<AgeBucket>,
    /// With --stacks: the group's most common kernel stack, innermost first (each stack is
    /// walked for a random sample of a site's allocations and attributed to the ones between).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_stack: Option<Vec<String>>,
    /// With --user-stacks: the user stack of that allocation's task, innermost first (frame
    /// pointers only: code built without them shows its innermost frames).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_stack: Option<Vec<String>>,
    /// The user stack went on into memory that is not code (a caller built without frame
    /// pointers): it is cut there.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub user_stack_truncated: bool,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct AgeBucket {
    /// Objects younger than this (ms); `None` for the last, open bucket.
    pub lt_ms: Option<u64>,
    pub objects: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CacheReport {
    pub name: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inferred: bool,
    /// Other names merged into this cache (/sys/kernel/slab).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Objects allocated since the start and still outstanding (of sites that free in sight).
    pub objects: u64,
    /// Some of the cache's sites free without an event (kfree_rcu, bulk frees): their
    /// outstanding objects are mostly freed already, so they are counted here and nowhere
    /// else.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub frees_untraced: bool,
    pub objects_frees_untraced: u64,
    /// Allocations at an address still tracked (the object before was freed without an event).
    pub implicit_frees: u64,
    pub bytes: u64,
    /// Change of the cache's active objects in /proc/slabinfo since the start. It also counts
    /// objects of untraced processes, and frees of objects older than the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slabinfo_delta: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slabinfo_active: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Totals {
    /// Outstanding objects tracked (allocated during the run, not freed yet).
    pub objects: u64,
    pub bytes: u64,
    /// Objects of caches whose frees this kernel does not trace, left out of `objects`.
    pub objects_frees_untraced: u64,
    /// Allocations, in what the report covers, at sites that free out of sight: counted, not
    /// tracked (and left out of `allocs`).
    pub allocs_not_tracked: u64,
    /// In what the report covers, every tracked allocation and free (`--cache` narrows the
    /// rows and `objects`, not these).
    pub allocs: u64,
    pub frees: u64,
    pub allocs_per_s: f64,
    pub frees_per_s: f64,
    /// Objects found freed without an event (their address was allocated again), in what the
    /// report covers.
    pub implicit_frees: u64,
    /// `--max-tracked`: objects the table was sized for.
    pub max_tracked: u32,
    /// Kernel memory the outstanding-object table takes.
    pub table_bytes: u64,
}

fn cache_label(g: &GroupReport) -> String {
    match &g.cache {
        Some(c) if g.cache_inferred => format!("{c}*"),
        Some(c) => c.clone(),
        None => "(several)".into(),
    }
}

/// The table, or folded stacks (`frames;...;cache objects`, outermost frame first).
pub fn render(r: &SlabReport, format: Format, top: usize, hist: bool) -> String {
    if format == Format::Folded {
        return folded(r);
    }
    let mut out = String::new();
    let what = match r.scope {
        Scope::Interval => format!("interval of {:.1}s", r.covers_s),
        Scope::Total => format!("{:.1}s", r.duration_s),
    };
    let _ = writeln!(
        out,
        "{}: {} objects outstanding ({}); {} allocs, {} frees in {what} ({:.0}/s, {:.0}/s)",
        if r.other_memory {
            "kernel memory"
        } else {
            "slab"
        },
        r.totals.objects,
        human_bytes(r.totals.bytes),
        r.totals.allocs,
        r.totals.frees,
        r.totals.allocs_per_s,
        r.totals.frees_per_s,
    );
    if let Some(ms) = r.min_age_ms {
        let _ = writeln!(out, "showing objects older than {}", human_age(ms));
    }
    let _ = writeln!(out);
    let first = match r.by {
        GroupBy::Callsite => "CALLSITE",
        GroupBy::Cache => "CACHE",
        GroupBy::Process => "PROCESS",
        GroupBy::Stack => "STACK (innermost)",
    };
    // By cache, the second column names the process when the row has one.
    let second = if r.by == GroupBy::Cache {
        "PROCESS"
    } else {
        "CACHE"
    };
    let _ = writeln!(
        out,
        "{:<44} {:<20} {:>9} {:>10} {:>8} {:>9} {:>9}  MAX AGE",
        first, second, "OBJECTS", "BYTES", "GROWTH", "ALLOCS", "FREES"
    );
    for g in r.groups.iter().take(top) {
        let label = match r.by {
            GroupBy::Process => format!(
                "{} {}",
                g.pid.map_or("-".into(), |p| p.to_string()),
                g.comm.as_deref().unwrap_or("?")
            ),
            GroupBy::Cache => cache_label(g),
            _ => g.callsite.clone().unwrap_or_else(|| "(several)".into()),
        };
        let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        let column = match r.by {
            GroupBy::Cache => match (g.pid, &g.comm) {
                (Some(pid), Some(comm)) => format!("{pid} {comm}"),
                _ => "(several)".into(),
            },
            _ => cache_label(g),
        };
        let _ = writeln!(
            out,
            "{:<44} {:<20} {:>9} {:>10} {:>+8} {:>9} {:>9}  {}",
            truncate(&label, 44),
            truncate(&column, 20),
            g.objects,
            human_bytes(g.bytes),
            g.growth_objects,
            opt(g.allocs),
            opt(g.frees),
            human_age(g.max_age_ms),
        );
        if let Some(stack) = &g.kernel_stack {
            for f in stack {
                let _ = writeln!(out, "    {f}");
            }
        }
        if hist {
            draw_ages(&mut out, &g.age_histogram);
        }
        if let Some(stack) = &g.user_stack {
            if g.kernel_stack.is_some() {
                let _ = writeln!(out, "    -- user --");
            }
            for f in stack {
                let _ = writeln!(out, "    {f}");
            }
            if g.user_stack_truncated {
                let _ = writeln!(out, "    [cut: the caller has no frame pointer]");
            }
        }
    }
    let shown = r.groups.len().min(top);
    if r.groups_total > shown {
        let _ = writeln!(out, "... {} more groups (--top)", r.groups_total - shown);
    }
    if r.groups.iter().any(|g| g.cache_inferred) {
        let _ = writeln!(
            out,
            "* kmalloc size class inferred from the size and gfp flags"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>10} {:>14}  ALIASES",
        "CACHE", "OBJECTS", "BYTES", "SLABINFO DELTA"
    );
    for c in r.caches.iter().take(top) {
        let mut name = if c.inferred {
            format!("{}*", c.name)
        } else {
            c.name.clone()
        };
        if c.frees_untraced {
            name.push('!');
        }
        let _ = writeln!(
            out,
            "{:<28} {:>9} {:>10} {:>14}  {}",
            truncate(&name, 28),
            c.objects,
            human_bytes(c.bytes),
            c.slabinfo_delta.map_or("-".into(), |d| format!("{d:+}")),
            c.aliases.join(",")
        );
    }
    for c in r.caches.iter().take(top).filter(|c| c.frees_untraced) {
        let _ = writeln!(
            out,
            "! {}: {} more objects of callsites whose frees this kernel does not trace \
             (kfree_rcu, bulk frees): most are freed, none is counted above",
            c.name, c.objects_frees_untraced
        );
    }
    if let Some(why) = &r.slabinfo_unavailable {
        let _ = writeln!(out, "slabinfo: {why}");
    }
    let _ = writeln!(
        out,
        "implicit frees {} (objects found freed with no event when their address came back)",
        r.totals.implicit_frees
    );
    if r.lost.events == 0 {
        let _ = writeln!(out, "lost: 0");
    } else {
        let _ = writeln!(out, "lost: {}", r.lost.events);
        for c in r.lost.causes.iter().filter(|c| c.count > 0) {
            let _ = writeln!(out, "  {} {}: {}", c.count, c.id, c.description);
        }
    }
    let _ = writeln!(
        out,
        "agent: rss {} MiB (peak {} MiB), cpu {:.2}s",
        r.agent.rss_bytes >> 20,
        r.agent.peak_rss_bytes >> 20,
        r.agent.cpu_user_s + r.agent.cpu_sys_s
    );
    out
}

/// A group's ages as bars, the way the classic BPF tools draw histograms.
fn draw_ages(out: &mut String, buckets: &[AgeBucket]) {
    const WIDTH: u64 = 40;
    let most = buckets.iter().map(|b| b.objects).max().unwrap_or(0).max(1);
    let mut lower = 0;
    for b in buckets {
        let label = match b.lt_ms {
            Some(lt) => format!("{} .. {}", human_age(lower), human_age(lt)),
            None => format!("{} ..", human_age(lower)),
        };
        lower = b.lt_ms.unwrap_or(lower);
        if b.objects == 0 {
            continue;
        }
        let bar = "#".repeat(((b.objects * WIDTH).div_ceil(most)) as usize);
        let _ = writeln!(out, "    {label:>16} {:>9} |{bar:<40}|", b.objects);
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn folded(r: &SlabReport) -> String {
    let mut out = String::new();
    for g in &r.groups {
        let mut frames: Vec<String> = Vec::new();
        if let Some(comm) = &g.comm {
            frames.push(comm.clone());
        }
        if let Some(user) = &g.user_stack {
            frames.extend(user.iter().rev().cloned());
        }
        match &g.kernel_stack {
            Some(stack) => frames.extend(stack.iter().rev().cloned()),
            None => frames.extend(g.callsite.clone()),
        }
        frames.push(cache_label(g));
        let line = frames
            .iter()
            .map(|f| f.replace([';', ' '], "_"))
            .collect::<Vec<_>>()
            .join(";");
        let _ = writeln!(out, "{line} {}", g.objects);
    }
    out
}

/// The age histogram as report buckets.
pub fn age_histogram(ages: &[u64]) -> Vec<AgeBucket> {
    ages.iter()
        .enumerate()
        .map(|(i, &objects)| AgeBucket {
            lt_ms: AGE_BUCKETS_MS.get(i).copied(),
            objects,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    fn sample() -> SlabReport {
        let group = GroupReport {
            callsite: Some("alloc_pipe_info+0xd7".into()),
            cache: Some("kmalloc-cg-1k".into()),
            cache_aliases: Vec::new(),
            cache_inferred: true,
            pid: Some(42),
            comm: Some("pipe maker".into()),
            objects: 2000,
            bytes: 2000 * 1024,
            requested_bytes: 2000 * 640,
            max_age_ms: 1500,
            growth_objects: 2000,
            allocs: Some(2000),
            frees: Some(0),
            age_histogram: age_histogram(&[0, 0, 0, 2000, 0, 0, 0, 0]),
            kernel_stack: Some(vec!["alloc_pipe_info+0xd7".into(), "do_pipe2+0x55".into()]),
            user_stack: Some(vec![
                "__GI_pipe2+0x7 (libc.so.6)".into(),
                "main+0x2d (app)".into(),
            ]),
            user_stack_truncated: true,
        };
        SlabReport {
            scope: Scope::Interval,
            duration_s: 2.0,
            covers_s: 1.0,
            by: GroupBy::Callsite,
            other_memory: false,
            min_age_ms: None,
            groups_total: 3,
            groups: vec![group],
            caches: vec![CacheReport {
                name: "signal_cache".into(),
                inferred: false,
                aliases: vec!["UNIX".into()],
                objects: 10,
                frees_untraced: false,
                objects_frees_untraced: 0,
                implicit_frees: 0,
                bytes: 11520,
                slabinfo_delta: Some(9),
                slabinfo_active: Some(150),
            }],
            totals: Totals::default(),
            lost: LostReport {
                events: 0,
                causes: Vec::new(),
            },
            slabinfo_unavailable: None,
            agent: AgentStats::current(0),
        }
    }

    #[test]
    fn folded_lines_read_from_the_outermost_frame_to_the_cache() {
        let text = render(&sample(), Format::Folded, 10, false);
        assert_eq!(
            text,
            "pipe_maker;main+0x2d_(app);__GI_pipe2+0x7_(libc.so.6);do_pipe2+0x55;\
             alloc_pipe_info+0xd7;kmalloc-cg-1k* 2000\n"
        );
    }

    #[test]
    fn the_table_names_rows_caches_and_what_was_cut() {
        let text = render(&sample(), Format::Table, 10, true);
        assert!(text.contains("interval of 1.0s"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("alloc_pipe_info+0xd7"))
            .unwrap_or_else(|| panic!("{text}"));
        for column in ["kmalloc-cg-1k*", "2000", "1.5s", "+2000"] {
            assert!(row.contains(column), "{column} missing: {row}");
        }
        assert!(text.contains("    do_pipe2+0x55"), "{text}");
        assert!(
            text.contains("1.0s .. 10.0s      2000 |########################################|"),
            "{text}"
        );
        assert!(text.contains("    -- user --"), "{text}");
        assert!(
            text.contains("    [cut: the caller has no frame pointer]"),
            "{text}"
        );
        assert!(text.contains("... 2 more groups (--top)"), "{text}");
        assert!(text.contains("* kmalloc size class inferred"), "{text}");
        let cache = text
            .lines()
            .find(|l| l.starts_with("signal_cache"))
            .unwrap();
        assert!(cache.contains("+9") && cache.ends_with("UNIX"), "{cache}");
    }

    #[test]
    fn histogram_buckets_end_open() {
        let h = age_histogram(&[1, 2, 0, 0, 0, 0, 0, 5]);
        assert_eq!(h.len(), AGE_BUCKETS_MS.len() + 1);
        assert_eq!(h[0].lt_ms, Some(10));
        assert_eq!(h.last().map(|b| (b.lt_ms, b.objects)), Some((None, 5)));
    }
}
