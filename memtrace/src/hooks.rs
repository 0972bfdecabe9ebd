//! Hook groups: the kernel programs an analysis needs, where each attaches, and which may be
//! missing. The loader attaches only the groups an analysis names, checks only their
//! tracepoint layouts, and `memtrace check` reports from this same table.
use aya::programs::perf_event::SoftwareEvent;

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum HookPoint {
    /// A tracepoint; `raw` names a raw-tracepoint program for the same hook, tried first (no
    /// trace record is built, which is a measurable share of a page fault's cost).
    Tracepoint {
        category: &'static str,
        name: &'static str,
        raw: Option<&'static str>,
        /// The leading arguments the raw program reads, as the kernel's BTF spells them
        /// ([`crate::btf::Btf::describe`]); checked before it attaches. Empty: not checked.
        raw_args: &'static [&'static str],
    },
    /// A BTF-typed tracepoint program (`tp_btf`) and no fallback within its group: its
    /// arguments and the current task are read with plain loads the verifier checks.
    BtfTracepoint {
        category: &'static str,
        name: &'static str,
    },
    /// A sampling perf software event on every CPU. `config` is its `PERF_COUNT_SW_*` number,
    /// for probing it without loading anything.
    PerfSoftware {
        event: SoftwareEvent,
        config: u64,
        period: PerfPeriod,
    },
}

/// How often a perf software event runs its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerfPeriod {
    /// On every event.
    Every,
    /// On one event in `TracerOptions::latency_period` (not attached when that is 0).
    LatencySample,
}

/// One kernel program and where it goes.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// The program's name in the eBPF object (the classic-tracepoint one for tracepoints).
    pub program: &'static str,
    pub point: HookPoint,
    /// An optional hook that cannot attach degrades the analysis (said at start and in
    /// `check`) instead of failing the run.
    pub optional: bool,
    /// What is lost without it, for messages.
    pub without: &'static str,
}

impl Hook {
    /// `category:name` for a tracepoint, the event's name for a perf event.
    pub fn describe(&self) -> String {
        match self.point {
            HookPoint::Tracepoint {
                category,
                name,
                raw: Some(raw),
                ..
            } if self.program.is_empty() => format!("{category}:{name} ({raw})"),
            HookPoint::Tracepoint { category, name, .. }
            | HookPoint::BtfTracepoint { category, name } => format!("{category}:{name}"),
            HookPoint::PerfSoftware { event, .. } => format!("perf software event {event:?}"),
        }
    }
}

/// Hooks that serve one purpose and are loaded together.
#[derive(Debug)]
pub struct HookGroup {
    pub name: &'static str,
    pub purpose: &'static str,
    pub hooks: &'static [Hook],
}

const fn tracepoint(
    program: &'static str,
    category: &'static str,
    name: &'static str,
    raw: Option<&'static str>,
) -> Hook {
    tracepoint_with(program, raw, category, name, &[])
}

/// A tracepoint with a raw program that reads the leading arguments `raw_args`, checked
/// against the kernel's BTF; the classic program `program` is the fallback (none if empty).
const fn checked_raw_tracepoint(
    program: &'static str,
    raw: &'static str,
    category: &'static str,
    name: &'static str,
    raw_args: &'static [&'static str],
) -> Hook {
    tracepoint_with(program, Some(raw), category, name, raw_args)
}

const fn tracepoint_with(
    program: &'static str,
    raw: Option<&'static str>,
    category: &'static str,
    name: &'static str,
    raw_args: &'static [&'static str],
) -> Hook {
    Hook {
        program,
        point: HookPoint::Tracepoint {
            category,
            name,
            raw,
            raw_args,
        },
        optional: false,
        without: "",
    }
}

const fn perf_software(program: &'static str, event: SoftwareEvent, config: u64) -> Hook {
    perf_software_at(program, event, config, PerfPeriod::Every)
}

const fn perf_software_at(
    program: &'static str,
    event: SoftwareEvent,
    config: u64,
    period: PerfPeriod,
) -> Hook {
    Hook {
        program,
        point: HookPoint::PerfSoftware {
            event,
            config,
            period,
        },
        optional: false,
        without: "",
    }
}

const fn btf_tracepoint(program: &'static str, category: &'static str, name: &'static str) -> Hook {
    Hook {
        program,
        point: HookPoint::BtfTracepoint { category, name },
        optional: false,
        without: "",
    }
}

/// A hook the run can go without, losing what `without` says.
const fn optional(hook: Hook, without: &'static str) -> Hook {
    Hook {
        optional: true,
        without,
        ..hook
    }
}

/// Fork, exec and exit: following a traced command's children and keeping the process table.
/// Every analysis needs it.
pub const PROCESSES: HookGroup = HookGroup {
    name: "processes",
    purpose: "following children; fork, exec and exit for the process table",
    hooks: &[
        tracepoint("task_newtask", "task", "task_newtask", None),
        tracepoint("sched_process_exec", "sched", "sched_process_exec", None),
        tracepoint("sched_process_exit", "sched", "sched_process_exit", None),
    ],
};

/// mmap, munmap, mremap and brk as they complete: the address-space model.
pub const MAPPINGS: HookGroup = HookGroup {
    name: "mappings",
    purpose: "mapping classification: mmap/munmap/mremap/brk as they complete",
    hooks: &[
        tracepoint("sys_enter_mmap", "syscalls", "sys_enter_mmap", None),
        tracepoint("sys_exit_mmap", "syscalls", "sys_exit_mmap", None),
        tracepoint("sys_enter_munmap", "syscalls", "sys_enter_munmap", None),
        tracepoint("sys_exit_munmap", "syscalls", "sys_exit_munmap", None),
        tracepoint("sys_enter_mremap", "syscalls", "sys_enter_mremap", None),
        tracepoint("sys_exit_mremap", "syscalls", "sys_exit_mremap", None),
        tracepoint("sys_enter_brk", "syscalls", "sys_enter_brk", None),
        tracepoint("sys_exit_brk", "syscalls", "sys_exit_brk", None),
    ],
};

/// mmap/munmap/mremap/brk for `memtrace vma`: one raw tracepoint on every syscall's exit,
/// which picks the mapping calls by the number in the saved registers and reads their
/// arguments there (no entry program, no pending-syscall map, no record built by the kernel:
/// a third of the cost of [`MAPPINGS`] on an mmap-heavy loop). Needs `bpf_probe_read_kernel`.
pub const MAPPINGS_AT_EXIT: HookGroup = HookGroup {
    name: "mappings-at-exit",
    purpose: "mmap/munmap/mremap/brk as they complete, from every syscall's exit",
    hooks: &[checked_raw_tracepoint(
        "",
        "sys_exit_raw",
        "raw_syscalls",
        "sys_exit",
        SYS_EXIT_RAW_ARGS,
    )],
};

/// What the raw `sys_exit` tracepoint passes, as [`MAPPINGS_AT_EXIT`] reads it.
pub const SYS_EXIT_RAW_ARGS: &[&str] = &["struct pt_regs *", "long"];

/// Page faults: the kernel's own accounting (counts, kind, stacks), the fault's entry (access
/// type, latency start) and the context switches a fault can span.
pub const FAULTS: HookGroup = HookGroup {
    name: "faults",
    purpose: "page faults: kind, count and stacks at the kernel's accounting; access type and latency from the entry",
    hooks: &[
        // PERF_COUNT_SW_PAGE_FAULTS_MIN and _MAJ.
        perf_software("fault_minor", SoftwareEvent::PageFaultsMin, 5),
        perf_software("fault_major", SoftwareEvent::PageFaultsMaj, 6),
        optional(
            tracepoint(
                "page_fault_user",
                "exceptions",
                "page_fault_user",
                Some("page_fault_user_raw"),
            ),
            "no latency and no access type for user-mode faults",
        ),
        optional(
            tracepoint(
                "page_fault_kernel",
                "exceptions",
                "page_fault_kernel",
                Some("page_fault_kernel_raw"),
            ),
            "no latency and no access type for kernel-mode faults on user memory",
        ),
        optional(
            tracepoint(
                "sched_switch",
                "sched",
                "sched_switch",
                Some("sched_switch_raw"),
            ),
            "no latency for faults that sleep (major faults, mostly)",
        ),
    ],
};

/// Page faults recorded at entry, the default where the kernel's BTF allows: one program per
/// fault at the exception's tracepoint sends the whole record (thread, address, access,
/// stack, the thread's own fault counts), and the kernel's accounting marks completions:
/// every major fault, and minor faults at a period (a latency sample). Whether and how the
/// kernel accounted each fault follows from the thread's counts at its next fault. Falls back
/// to [`FAULTS`] when a hook here cannot attach.
pub const FAULTS_AT_ENTRY: HookGroup = HookGroup {
    name: "faults-at-entry",
    purpose: "page faults: records at entry; kind from the thread's counts and the kernel's accounting; latency of every major and a sample of minor faults",
    hooks: &[
        btf_tracepoint("page_fault_user_btf", "exceptions", "page_fault_user"),
        btf_tracepoint("page_fault_kernel_btf", "exceptions", "page_fault_kernel"),
        // Each CPU's batch goes out when a thread leaves it: a thread's records stay in order.
        raw_only("sched_switch_flush_raw", "sched", "sched_switch", &[]),
        perf_software("fault_major_done", SoftwareEvent::PageFaultsMaj, 6),
        optional(
            perf_software_at(
                "fault_minor_done",
                SoftwareEvent::PageFaultsMin,
                5,
                PerfPeriod::LatencySample,
            ),
            "no minor-fault latency",
        ),
    ],
};

/// Slab allocations and frees (include/trace/events/kmem.h): the outstanding-object map.
pub const SLAB: HookGroup = HookGroup {
    name: "slab",
    purpose: "slab objects: kmalloc/kmem_cache_alloc add, kfree/kmem_cache_free remove",
    hooks: &[
        checked_raw_tracepoint(
            "kmalloc",
            "kmalloc_raw",
            "kmem",
            "kmalloc",
            &["unsigned long", "void *", "size_t", "size_t", "gfp_t"],
        ),
        checked_raw_tracepoint(
            "kmem_cache_alloc",
            "kmem_cache_alloc_raw",
            "kmem",
            "kmem_cache_alloc",
            &["unsigned long", "void *", "struct kmem_cache *", "gfp_t"],
        ),
        checked_raw_tracepoint(
            "kfree",
            "kfree_raw",
            "kmem",
            "kfree",
            &["unsigned long", "void *"],
        ),
        checked_raw_tracepoint(
            "kmem_cache_free",
            "kmem_cache_free_raw",
            "kmem",
            "kmem_cache_free",
            &["unsigned long", "void *"],
        ),
        // Second programs for the frees the first ones skip while interrupted (raw only:
        // classic tracepoint programs all skip while any BPF program runs on the CPU).
        optional(
            checked_raw_tracepoint(
                "",
                "kfree_backup_raw",
                "kmem",
                "kfree",
                &["unsigned long", "void *"],
            ),
            "kfrees in interrupts that land during the free program are missed (objects stay \
             outstanding until their address is allocated again)",
        ),
        optional(
            checked_raw_tracepoint(
                "",
                "kmem_cache_free_backup_raw",
                "kmem",
                "kmem_cache_free",
                &["unsigned long", "void *"],
            ),
            "kmem_cache_frees in interrupts that land during the free program are missed \
             (objects stay outstanding until their address is allocated again)",
        ),
    ],
};

/// Raw tracepoints only (no classic fallback): these keep no record layout to check.
const fn raw_only(
    raw: &'static str,
    category: &'static str,
    name: &'static str,
    raw_args: &'static [&'static str],
) -> Hook {
    checked_raw_tracepoint("", raw, category, name, raw_args)
}

/// Page allocations (`memtrace slab --pages`).
pub const PAGES: HookGroup = HookGroup {
    name: "pages",
    purpose: "page allocations: mm_page_alloc adds, mm_page_free(_batched) remove",
    hooks: &[
        raw_only(
            "mm_page_alloc_raw",
            "kmem",
            "mm_page_alloc",
            &["struct page *", "unsigned int", "gfp_t"],
        ),
        raw_only(
            "mm_page_free_raw",
            "kmem",
            "mm_page_free",
            &["struct page *"],
        ),
        raw_only(
            "mm_page_free_batched_raw",
            "kmem",
            "mm_page_free_batched",
            &["struct page *"],
        ),
    ],
};

/// Per-CPU allocations (`memtrace slab --percpu`).
pub const PERCPU: HookGroup = HookGroup {
    name: "percpu",
    purpose: "per-CPU allocations: percpu_alloc_percpu adds, percpu_free_percpu removes",
    hooks: &[
        raw_only(
            "percpu_alloc_percpu_raw",
            "percpu",
            "percpu_alloc_percpu",
            &[
                "unsigned long",
                "bool",
                "bool",
                "size_t",
                "size_t",
                "void *",
                "int",
                "void *",
                "size_t",
                "gfp_t",
            ],
        ),
        raw_only(
            "percpu_free_percpu_raw",
            "percpu",
            "percpu_free_percpu",
            &["void *", "int", "void *"],
        ),
        raw_only(
            "percpu_free_percpu_backup_raw",
            "percpu",
            "percpu_free_percpu",
            &["void *", "int", "void *"],
        ),
    ],
};

/// vmalloc areas (`memtrace slab --vmalloc`).
pub const VMALLOC: HookGroup = HookGroup {
    name: "vmalloc",
    purpose: "vmalloc areas: alloc_vmap_area adds, free_vmap_area_noflush removes",
    hooks: &[
        raw_only(
            "alloc_vmap_area_raw",
            "vmalloc",
            "alloc_vmap_area",
            &[
                "unsigned long",
                "unsigned long",
                "unsigned long",
                "unsigned long",
                "unsigned long",
                "int",
            ],
        ),
        raw_only(
            "free_vmap_area_noflush_raw",
            "vmalloc",
            "free_vmap_area_noflush",
            &["unsigned long"],
        ),
        raw_only(
            "free_vmap_area_noflush_backup_raw",
            "vmalloc",
            "free_vmap_area_noflush",
            &["unsigned long"],
        ),
    ],
};

/// Who grows a process's RSS, per thread (`memtrace watch --trace`).
pub const RSS: HookGroup = HookGroup {
    name: "rss",
    purpose: "anonymous RSS changes per thread and moment (kmem:rss_stat)",
    hooks: &[optional(
        tracepoint("rss_stat", "kmem", "rss_stat", None),
        "no per-thread RSS attribution",
    )],
};

/// Every group, for `memtrace check`.
pub const ALL: &[&HookGroup] = &[
    &PROCESSES,
    &MAPPINGS,
    &MAPPINGS_AT_EXIT,
    &FAULTS_AT_ENTRY,
    &FAULTS,
    &SLAB,
    &PAGES,
    &PERCPU,
    &VMALLOC,
    &RSS,
];
