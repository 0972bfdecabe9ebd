//! Fault reports: a plain data structure built from the aggregates, rendered as a table, one
//! JSON document, or folded stacks for flame graphs.
use std::{collections::HashMap, fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{
    addrspace::MappingClass,
    collector::Collector,
    fault::{Access, Cause, Counts, FaultKind, Latency, LatencySummary},
    loader::KernelCounters,
    symbolize::{Frame, Symbolizer},
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
    pub pid: u32,
    pub comm: String,
    pub minor: u64,
    pub major: u64,
    /// Faults taken in kernel mode on user addresses (copy_from_user and the like).
    pub kernel_mode: u64,
    pub exited: bool,
    pub latency_ns: KindLatency,
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
}

#[derive(Clone, Debug, Serialize)]
pub struct Loss {
    pub cause: &'static str,
    pub count: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LostReport {
    /// Fault records that never reached the agent (counts are low by this much).
    pub events: u64,
    pub causes: Vec<Loss>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    pub duration_s: f64,
    pub minor: u64,
    pub major: u64,
    pub processes: Vec<ProcessReport>,
    pub callsites: Vec<CallsiteReport>,
    pub lost: LostReport,
    /// User stacks reused from the in-kernel cache instead of walked again.
    pub stack_cache_hits: u64,
}

fn access_list(map: &HashMap<(Access, Cause), u64>) -> Vec<AccessReport> {
    let mut v: Vec<_> = map
        .iter()
        .map(|(&(access, cause), &count)| AccessReport {
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
    pub stack: &'a dyn Fn(u32) -> Option<Vec<u64>>,
    pub elapsed: Duration,
}

pub fn build(
    input: &ReportInput<'_>,
    symbolizer: &mut Symbolizer,
    opts: &ReportOptions,
) -> FaultReport {
    let agg = &input.collector.faults;
    let procs = &input.collector.processes;
    let comm = |pid: u32| procs.get(&pid).map(|p| p.comm.clone()).unwrap_or_default();

    let mut processes: Vec<ProcessReport> = agg
        .processes
        .iter()
        .map(|(&pid, p)| {
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
                .map(|(&class, c)| ClassReport {
                    class,
                    minor: c.minor,
                    major: c.major,
                })
                .collect();
            mappings.sort_by_key(|m| std::cmp::Reverse(m.minor + m.major));
            ProcessReport {
                pid,
                comm: comm(pid),
                minor: p.counts.minor,
                major: p.counts.major,
                kernel_mode: p.kernel_mode,
                exited: procs.get(&pid).is_some_and(|p| p.exited),
                latency_ns: KindLatency {
                    minor: p.latency[0].summary(),
                    major: p.latency[1].summary(),
                },
                threads,
                mappings,
                access: access_list(&p.by_access),
                log2_hist: [
                    log2_buckets(p.latency[0].hist()),
                    log2_buckets(p.latency[1].hist()),
                ],
            }
        })
        .collect();
    processes.sort_by(|a, b| {
        (b.minor + b.major)
            .cmp(&(a.minor + a.major))
            .then(a.pid.cmp(&b.pid))
    });

    // Symbolize every stack, then merge callsites whose stacks name the same functions: an
    // unrolled loop faults from several instructions of one function, and a user asks "which
    // function", not "which instruction".
    let empty = crate::addrspace::AddressSpace::default();
    type MergeKey = (u32, FaultKind, MappingClass, Option<String>, Vec<String>);
    type Merged = (CallsiteReport, Latency, HashMap<(Access, Cause), u64>);
    let mut merged: HashMap<MergeKey, Merged> = HashMap::new();
    for (k, v) in &agg.callsites {
        let space = procs.get(&k.pid).map_or(&empty, |p| &p.space);
        let frames = k
            .user_stack
            .and_then(|id| (input.stack)(id))
            .map(|ips| symbolizer.user_stack(space, &ips))
            .unwrap_or_default();
        let kernel_frames = k
            .kernel_stack
            .and_then(|id| (input.stack)(id))
            .map(|ips| symbolizer.kernel_stack(&ips))
            .unwrap_or_default();
        let names = frames
            .iter()
            .chain(&kernel_frames)
            .map(|f| format!("{}@{}", f.function, f.module))
            .collect();
        let path = k.path.as_deref().map(str::to_string);
        let key = (k.pid, k.kind, k.class, path.clone(), names);
        let entry = merged.entry(key).or_insert_with(|| {
            let site = CallsiteReport {
                pid: k.pid,
                comm: comm(k.pid),
                kind: k.kind,
                count: 0,
                mapping: MappingReport {
                    class: k.class,
                    path,
                },
                access: Vec::new(),
                latency_ns: LatencySummary::default(),
                frames,
                kernel_frames,
            };
            (site, Latency::default(), HashMap::new())
        });
        entry.0.count += v.count;
        entry.1.merge(&v.latency);
        for (a, n) in &v.by_access {
            *entry.2.entry(*a).or_default() += n;
        }
    }
    let mut callsites: Vec<CallsiteReport> = merged
        .into_values()
        .map(|(mut site, latency, access)| {
            site.latency_ns = latency.summary();
            site.access = access_list(&access);
            site
        })
        .collect();
    callsites.sort_by_key(|s| std::cmp::Reverse(s.count));
    if opts.format == Format::Table {
        callsites.truncate(opts.top);
    }

    let c = input.counters;
    let stats = input.collector.stats;
    let causes = vec![
        Loss {
            cause: "ring buffer full (fault records dropped)",
            count: c.ringbuf_full_fault,
        },
        Loss {
            cause: "ring buffer full (mmap/process records dropped)",
            count: c.ringbuf_full_other,
        },
        Loss {
            cause: "user stack not captured (stack map full or walk failed)",
            count: c.user_stack_lost,
        },
        Loss {
            cause: "kernel stack not captured",
            count: c.kernel_stack_lost,
        },
        Loss {
            cause: "fault entry not seen (no latency or access type)",
            count: c.entry_missed,
        },
        Loss {
            cause: "pending-fault map full at context switch",
            count: c.pending_full,
        },
        Loss {
            cause: "pending-syscall map full (mapping change missed)",
            count: c.syscall_pending_full,
        },
        Loss {
            cause: "target map full (child processes not followed)",
            count: c.targets_full,
        },
        Loss {
            cause: "undecodable records",
            count: stats.undecodable,
        },
        Loss {
            cause: "fault address outside every known mapping",
            count: stats.unclassified,
        },
    ];
    let Counts { minor, major } = agg.total();
    FaultReport {
        duration_s: input.elapsed.as_secs_f64(),
        minor,
        major,
        processes,
        callsites,
        lost: LostReport {
            events: c.ringbuf_full_fault,
            causes,
        },
        stack_cache_hits: c.stack_cache_hits,
    }
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
        "memtrace faults: {:.1}s, {} minor, {} major in {} process(es); lost {} fault records",
        r.duration_s,
        r.minor,
        r.major,
        r.processes.len(),
        r.lost.events
    );
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
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}  {}{}",
            p.pid,
            p.comm,
            p.minor,
            p.major,
            lat(&l.minor, l.minor.p50),
            lat(&l.minor, l.minor.p99),
            lat(&l.major, l.major.p50),
            lat(&l.major, l.major.p99),
            maps.join(", "),
            if p.exited { "  (exited)" } else { "" }
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
        let _ = writeln!(
            out,
            "{:>10} {} {}{} {} p50 {} pid {} ({})",
            c.count,
            c.kind.as_str(),
            c.mapping.class,
            path,
            access,
            ns(c.latency_ns.p50),
            c.pid,
            c.comm
        );
        // Innermost first: a kernel-mode fault's kernel frames sit below the syscall's user frames.
        for f in c.kernel_frames.iter().take(6) {
            let _ = writeln!(out, "{:>12}[k] {}", "", f.display());
        }
        for f in c.frames.iter().take(8) {
            let _ = writeln!(out, "{:>12}{}", "", f.display());
        }
    }
    let lost: Vec<String> = r
        .lost
        .causes
        .iter()
        .filter(|l| l.count > 0)
        .map(|l| format!("{}: {}", l.cause, l.count))
        .collect();
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
        collector.faults.record(&crate::fault::Fault {
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
        });
        let stack = |_| None;
        let input = ReportInput {
            collector: &collector,
            counters: KernelCounters {
                ringbuf_full_fault: 3,
                ..Default::default()
            },
            stack: &stack,
            elapsed: Duration::from_secs(2),
        };
        let opts = ReportOptions {
            format: Format::Table,
            top: 10,
            threads: true,
            hist: true,
        };
        let r = build(&input, &mut Symbolizer::new(), &opts);
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
        assert_eq!(json["lost"]["causes"][0]["count"], 3);
        assert_eq!(render_folded(&r), ";[major file_private] 1\n");
    }
}
