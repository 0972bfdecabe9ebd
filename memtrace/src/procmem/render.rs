//! `memtrace snapshot` as a table: processes by USS, each one's kinds of memory when asked
//! for by pid, and the system's figures itemized so they add up.
use std::fmt::Write as _;

use super::{ProcessMemory, Snapshot};
use crate::units::human_bytes;

fn kinds_columns(p: &ProcessMemory) -> [String; 3] {
    let Some(k) = &p.kinds else {
        return ["-".into(), "-".into(), "-".into()];
    };
    let anon = k.anon_private.rss + k.heap.rss + k.stack.rss;
    let file = k.file_private.rss + k.file_shared.rss;
    [
        human_bytes(anon),
        human_bytes(k.anon_shared.rss),
        human_bytes(file),
    ]
}

fn comm_cell(comm: &str) -> String {
    if comm.chars().count() > 16 {
        comm.chars().take(15).chain(['…']).collect()
    } else {
        comm.to_string()
    }
}

/// The processes table, at most `top` rows (0: all).
fn processes(out: &mut String, snap: &Snapshot, top: usize) {
    let _ = writeln!(
        out,
        "{:>8} {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "PID", "COMM", "VSS", "RSS", "PSS", "USS", "SWAP", "ANON", "SHMEM", "FILE"
    );
    let rows = if top == 0 { usize::MAX } else { top };
    for p in snap.processes.iter().take(rows) {
        let [anon, shmem, file] = kinds_columns(p);
        let _ = writeln!(
            out,
            "{:>8} {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            p.pid,
            comm_cell(&p.comm),
            human_bytes(p.vss),
            human_bytes(p.rss),
            human_bytes(p.pss),
            human_bytes(p.uss),
            human_bytes(p.swap),
            anon,
            shmem,
            file
        );
    }
    if snap.processes.len() > rows {
        let _ = writeln!(
            out,
            "{:>8} ({} more processes; --top 0 lists all)",
            "",
            snap.processes.len() - rows
        );
    }
}

/// One process's memory by kind, as `pmap -x` would sum it.
fn kinds(out: &mut String, p: &ProcessMemory) {
    let Some(k) = &p.kinds else {
        return;
    };
    let _ = writeln!(out, "\npid {} ({}) by kind of memory:", p.pid, p.comm);
    let _ = writeln!(
        out,
        "  {:<13} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "KIND", "VSS", "RSS", "PSS", "USS", "SWAP"
    );
    for (class, f) in k.iter() {
        if f.size == 0 && f.rss == 0 && f.swap == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<13} {:>9} {:>9} {:>9} {:>9} {:>9}",
            class.as_str(),
            human_bytes(f.size),
            human_bytes(f.rss),
            human_bytes(f.pss),
            human_bytes(f.uss),
            human_bytes(f.swap)
        );
    }
}

fn system(out: &mut String, snap: &Snapshot) {
    let Some(s) = &snap.system else {
        return;
    };
    let m = &s.meminfo;
    let _ = writeln!(
        out,
        "\nsystem (/proc/meminfo): {} total, {} in use, {} free, {} available",
        human_bytes(m.mem_total),
        human_bytes(m.used()),
        human_bytes(m.mem_free),
        human_bytes(m.mem_available)
    );
    let line = |out: &mut String, what: &str, bytes: u64, note: String| {
        let _ = writeln!(out, "  {what:<26} {:>9}  {note}", human_bytes(bytes));
    };
    line(
        out,
        "private (AnonPages)",
        m.anon_pages,
        "processes' anon_private, heap, stack and copied-on-write file pages".into(),
    );
    line(
        out,
        "page cache (Cached)",
        m.cached,
        format!(
            "file pages, {} of them mapped; Shmem {} of it (anon_shared: tmpfs, /dev/shm, SysV)",
            human_bytes(m.mapped),
            human_bytes(m.shmem)
        ),
    );
    line(
        out,
        "buffers (Buffers)",
        m.buffers,
        "block-device metadata".into(),
    );
    if m.swap_cached > 0 {
        line(out, "swap cache (SwapCached)", m.swap_cached, String::new());
    }
    line(
        out,
        "slab (Slab)",
        m.slab,
        format!(
            "reclaimable {}, unreclaimable {} (`memtrace slab` names who allocates)",
            human_bytes(m.s_reclaimable),
            human_bytes(m.s_unreclaim)
        ),
    );
    let kernel_other = m.kernel_stack + m.page_tables + m.vmalloc_used + m.percpu;
    line(
        out,
        "kernel, other",
        kernel_other,
        format!(
            "stacks {}, page tables {}, vmalloc {}, percpu {}",
            human_bytes(m.kernel_stack),
            human_bytes(m.page_tables),
            human_bytes(m.vmalloc_used),
            human_bytes(m.percpu)
        ),
    );
    line(
        out,
        "not itemized",
        s.not_itemized,
        "in use and in none of the above (drivers, huge pages, the kernel image)".into(),
    );
    let _ = writeln!(
        out,
        "  processes read: PSS {} in all, USS {}, swap {} (swap total {}, free {})",
        human_bytes(s.processes_pss),
        human_bytes(s.processes_uss),
        human_bytes(s.processes_swap),
        human_bytes(m.swap_total),
        human_bytes(m.swap_free)
    );
    match &s.slab_caches_error {
        Some(e) => {
            let _ = writeln!(out, "  slab caches: {e}");
        }
        None if !s.slab_caches.is_empty() => {
            let caches: Vec<String> = s
                .slab_caches
                .iter()
                .map(|c| format!("{} {}", c.name, human_bytes(c.bytes)))
                .collect();
            let _ = writeln!(out, "  slab caches holding most: {}", caches.join(", "));
        }
        None => {}
    }
}

/// The whole snapshot as text, at most `top` processes (0: all).
pub fn render(snap: &Snapshot, top: usize) -> String {
    let mut out = String::new();
    let mut head = format!(
        "{} processes, by USS (read in {:.0} ms)",
        snap.processes.len(),
        snap.took_ms
    );
    if snap.kernel_threads > 0 {
        let _ = write!(
            head,
            "; {} kernel threads have no user memory",
            snap.kernel_threads
        );
    }
    let _ = writeln!(out, "{head}\n");
    if !snap.processes.is_empty() {
        processes(&mut out, snap, top);
    }
    if snap.show_kinds {
        for p in snap
            .processes
            .iter()
            .take(if top == 0 { usize::MAX } else { top })
        {
            kinds(&mut out, p);
        }
    }
    system(&mut out, snap);
    if !snap.skipped.is_empty() {
        let _ = writeln!(out);
    }
    if snap.skipped.len() > 8 {
        // System-wide without root: other users' processes, by reason.
        let mut reasons: Vec<(super::Unreadable, usize)> = Vec::new();
        for s in &snap.skipped {
            match reasons.iter_mut().find(|(r, _)| *r == s.reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((s.reason, 1)),
            }
        }
        for (reason, n) in reasons {
            let _ = writeln!(out, "not read: {n} processes: {}", reason.describe());
        }
    } else {
        for s in &snap.skipped {
            let comm = s
                .comm
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "not read: pid {}{comm}: {}",
                s.pid,
                s.reason.describe()
            );
        }
    }
    out
}
