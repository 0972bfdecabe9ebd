//! `memtrace check`: what this kernel allows and which attach method each feature uses.
use std::{fmt::Write as _, path::Path};

use crate::{
    hooks::{self, HookPoint},
    loader::{Tracer, TracerOptions},
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
    for group in hooks::ALL {
        for hook in group.hooks {
            let need = if hook.optional {
                format!("optional, without it: {}", hook.without)
            } else {
                format!("needed by {}", group.name)
            };
            let (ok, detail) = match (hook.point, &tracefs) {
                (HookPoint::Tracepoint { category, name, .. }, Ok(tfs)) => {
                    if !tracefs::tracepoint_exists(tfs, category, name) {
                        (hook.optional, format!("missing ({need})"))
                    } else {
                        match tracefs::check_tracepoint_layout(tfs, category, name) {
                            Ok(()) => (true, "present".to_string()),
                            // Raw tracepoints read arguments, not the record: only the classic
                            // fallback depends on the layout.
                            Err(e) => (hook.optional, format!("{e} ({need})")),
                        }
                    }
                }
                (HookPoint::BtfTracepoint { category, name }, Ok(tfs)) => {
                    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
                    if tracefs::tracepoint_exists(tfs, category, name) && btf {
                        (true, "present, with the kernel's BTF".to_string())
                    } else {
                        // Not fatal: faults fall back to records at the kernel's accounting.
                        (
                            true,
                            "unavailable (no BTF or no tracepoint): `faults` records at the \
                             kernel's accounting instead (group `faults`)"
                                .to_string(),
                        )
                    }
                }
                (HookPoint::Tracepoint { .. } | HookPoint::BtfTracepoint { .. }, Err(_)) => {
                    (false, "tracefs unavailable".into())
                }
                (HookPoint::PerfSoftware { config, .. }, _) => match perf_sw_event_opens(config) {
                    Ok(()) => (true, "opens".to_string()),
                    Err(e) => (hook.optional, format!("{e} ({need})")),
                },
            };
            probes.push(probe(
                format!("{}: {}", group.name, hook.describe()),
                ok,
                detail,
            ));
        }
    }
    if let Ok(tfs) = &tracefs {
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
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    probes.push(probe(
        "BTF",
        true,
        if btf {
            "/sys/kernel/btf/vmlinux present (fault records at entry, raw-tracepoint argument checks)"
        } else {
            "absent: faults are recorded at the kernel's accounting (slower); raw tracepoint arguments unchecked"
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
        match Tracer::load(
            TracerOptions {
                filter_pids: true,
                ..TracerOptions::default()
            },
            hooks::ALL,
        ) {
            Ok(tracer) => {
                probes.push(probe(
                    "load + attach all programs",
                    true,
                    "ring buffer, per-CPU maps, tracepoints, perf events: ok",
                ));
                for (hook, method) in &tracer.attach_methods {
                    probes.push(probe(format!("attach {hook}"), true, method.to_string()));
                }
                for d in &tracer.degraded {
                    probes.push(probe(format!("attach {}", d.hook), true, d.to_string()));
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
            "{:<4} {:<62} {}",
            if p.ok { "ok" } else { "FAIL" },
            p.what,
            p.detail
        );
    }
    out.push_str("\nhook groups (each analysis attaches only its own):\n");
    for group in hooks::ALL {
        let _ = writeln!(out, "  {:<10} {}", group.name, group.purpose);
    }
    out
}
