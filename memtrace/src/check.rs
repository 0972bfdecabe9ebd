//! `memtrace check`: what this kernel allows and which attach method each feature uses.
use std::{fmt::Write as _, path::Path};

use crate::{
    loader::{Tracer, TracerOptions, PERF_EVENTS, TRACEPOINTS},
    tracefs,
};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

fn probe(what: impl Into<String>, ok: bool, detail: impl Into<String>) -> Probe {
    Probe {
        what: what.into(),
        ok,
        detail: detail.into(),
    }
}

fn perf_sw_event_opens(config: u64) -> Result<(), std::io::Error> {
    // A counting (not sampling) software event on CPU 0 for all processes.
    let mut attr: [u64; 16] = [0; 16];
    // struct perf_event_attr: type (u32) | size (u32), then config (u64).
    attr[0] = 1 /* PERF_TYPE_SOFTWARE */ | ((std::mem::size_of_val(&attr) as u64) << 32);
    attr[1] = config;
    // SAFETY: `attr` is a zeroed perf_event_attr of the size it declares; the returned fd is
    // closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), -1, 0, -1, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a valid descriptor we own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

pub fn run() -> (Vec<Probe>, bool) {
    let mut probes = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    probes.push(probe(
        "root",
        root,
        if root {
            "yes"
        } else {
            "no: run memtrace as root"
        },
    ));
    let tracefs = tracefs::ensure_mounted();
    match &tracefs {
        Ok(p) => probes.push(probe(
            "tracefs",
            true,
            format!("mounted at {}", p.display()),
        )),
        Err(e) => probes.push(probe("tracefs", false, e.to_string())),
    }
    if let Ok(tfs) = &tracefs {
        for (_, category, name) in TRACEPOINTS {
            let ok = tracefs::tracepoint_exists(tfs, category, name);
            probes.push(probe(
                format!("tracepoint {category}:{name}"),
                ok,
                if ok { "present" } else { "missing" },
            ));
        }
        match tracefs::check_layout(tfs) {
            Ok(()) => probes.push(probe(
                "tracepoint layouts",
                true,
                "match the compiled-in offsets",
            )),
            Err(e) => probes.push(probe("tracepoint layouts", false, e.to_string())),
        }
        let kprobes = tfs.join("kprobe_events").exists();
        probes.push(probe(
            "kprobes",
            true,
            if kprobes {
                "available (not needed)"
            } else {
                "not built in (not needed)"
            },
        ));
    }
    for (prog, (_, event)) in PERF_EVENTS.iter().enumerate() {
        let config = match prog {
            0 => 5,
            _ => 6,
        }; // PERF_COUNT_SW_PAGE_FAULTS_{MIN,MAJ}
        match perf_sw_event_opens(config) {
            Ok(()) => probes.push(probe(
                format!("perf software event {event:?}"),
                true,
                "opens",
            )),
            Err(e) => probes.push(probe(
                format!("perf software event {event:?}"),
                false,
                e.to_string(),
            )),
        }
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    probes.push(probe(
        "BTF",
        true,
        if btf {
            "/sys/kernel/btf/vmlinux present (not needed)"
        } else {
            "absent (not needed)"
        },
    ));
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            "unknown (securityfs not mounted); memtrace never reads kernel memory".into()
        });
    probes.push(probe("lockdown", true, lockdown));
    let kallsyms = std::fs::read_to_string("/proc/kallsyms")
        .map(|s| {
            s.lines()
                .next()
                .is_some_and(|l| !l.starts_with("0000000000000000"))
        })
        .unwrap_or(false);
    probes.push(probe(
        "kernel symbols",
        kallsyms,
        if kallsyms {
            "/proc/kallsyms has addresses"
        } else {
            "hidden: kernel frames will not symbolize"
        },
    ));

    if root {
        match Tracer::load(TracerOptions {
            filter_pids: true,
            ..TracerOptions::default()
        }) {
            Ok(tracer) => {
                probes.push(probe(
                    "load + attach all programs",
                    true,
                    "ring buffer, stack map, per-CPU maps, tracepoints, perf events: ok",
                ));
                for (hook, method) in &tracer.attach_methods {
                    probes.push(probe(format!("attach {hook}"), true, method.to_string()));
                }
            }
            Err(e) => probes.push(probe("load + attach all programs", false, e.to_string())),
        }
    }
    let ok = probes.iter().all(|p| p.ok);
    (probes, ok)
}

pub fn render(probes: &[Probe]) -> String {
    let mut out = String::new();
    for p in probes {
        let _ = writeln!(
            out,
            "{:<4} {:<44} {}",
            if p.ok { "ok" } else { "FAIL" },
            p.what,
            p.detail
        );
    }
    out.push_str(
        "\nattach methods:\n  fault entry, access type   exceptions:page_fault_{user,kernel} (raw tracepoints, else tracepoints)\n  \
         fault kind, count, stacks  perf software events page-faults-min/maj (the kernel's accounting), one per CPU\n  \
         fault latency              entry timestamp per CPU, carried across context switches (sched:sched_switch)\n  \
         mapping classification     /proc/PID/maps + syscalls:sys_{enter,exit}_{mmap,munmap,mremap,brk}\n  \
         following children         task:task_newtask, sched:sched_process_{exec,exit}\n",
    );
    out
}
