//! Loading the kernel programs, attaching them, and the agent's handles on their maps.
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        PerfEvent, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use memtrace_common::{counter, Config};

use crate::{tracefs, Error};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));

/// Tracepoints and the program attached to each.
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("page_fault_user", "exceptions", "page_fault_user"),
    ("page_fault_kernel", "exceptions", "page_fault_kernel"),
    ("sched_switch", "sched", "sched_switch"),
    ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
    ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
    ("sys_exit_munmap", "syscalls", "sys_exit_munmap"),
    ("sys_enter_mremap", "syscalls", "sys_enter_mremap"),
    ("sys_exit_mremap", "syscalls", "sys_exit_mremap"),
    ("sys_enter_brk", "syscalls", "sys_enter_brk"),
    ("sys_exit_brk", "syscalls", "sys_exit_brk"),
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Perf software events (the kernel's own fault accounting) and their programs.
pub const PERF_EVENTS: &[(&str, SoftwareEvent)] = &[
    ("fault_minor", SoftwareEvent::PageFaultsMin),
    ("fault_major", SoftwareEvent::PageFaultsMaj),
];

#[derive(Clone, Copy, Debug)]
pub struct TracerOptions {
    /// Trace only the pids added with [`Tracer::add_target`] (and their children).
    pub filter_pids: bool,
    pub capture_stacks: bool,
    pub stack_cache: bool,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ringbuf_bytes: u32,
    /// Attach classic tracepoints even where raw tracepoints work (for comparison).
    pub classic_tracepoints: bool,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            filter_pids: false,
            capture_stacks: true,
            stack_cache: true,
            ringbuf_bytes: 16 * 1024 * 1024,
            classic_tracepoints: false,
        }
    }
}

/// Loss and efficiency counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_full_fault: u64,
    pub ringbuf_full_other: u64,
    pub user_stack_lost: u64,
    pub kernel_stack_lost: u64,
    pub entry_missed: u64,
    pub pending_full: u64,
    pub targets_full: u64,
    pub stack_cache_hits: u64,
    pub syscall_pending_full: u64,
}

/// Loaded and attached kernel programs.
pub struct Tracer {
    // Keeps programs and links alive for as long as the tracer lives.
    _ebpf: Ebpf,
    pub events: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    targets: HashMap<MapData, u32, u8>,
    targets_generation: Array<MapData, u64>,
    /// How each hook got attached, for `memtrace check`.
    pub attach_methods: Vec<(String, AttachMethod)>,
}

/// How a hook is attached, chosen by trying the cheapest kind first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachMethod {
    /// `BPF_RAW_TRACEPOINT_OPEN`: the program gets the tracepoint's arguments directly.
    RawTracepoint,
    /// A classic tracepoint (perf event + trace record) because raw ones are not allowed.
    TracepointAfterRawFailed(String),
    /// A classic tracepoint, by configuration or because no raw program exists for it.
    Tracepoint,
    /// A sampling software perf event, period 1, on each of this many CPUs.
    PerfEventPerCpu(usize),
}

impl std::fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RawTracepoint => f.write_str("raw tracepoint"),
            Self::TracepointAfterRawFailed(why) => {
                write!(f, "tracepoint (raw tracepoint refused: {why})")
            }
            Self::Tracepoint => f.write_str("tracepoint"),
            Self::PerfEventPerCpu(n) => write!(f, "perf event, period 1, on each of {n} CPUs"),
        }
    }
}

/// Raw-tracepoint programs for the hot hooks, by tracepoint name. A raw tracepoint skips
/// building the trace record, which is a measurable share of a page fault's cost.
pub const RAW_TRACEPOINTS: &[(&str, &str)] = &[
    ("page_fault_user_raw", "page_fault_user"),
    ("page_fault_kernel_raw", "page_fault_kernel"),
    ("sched_switch_raw", "sched_switch"),
];

fn attach_tracepoint(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<(), Error> {
    let tp: &mut TracePoint = program(ebpf, prog)?;
    tp.load().map_err(|e| load_error(prog, e))?;
    tp.attach(category, name).map_err(|e| Error::Attach {
        what: format!("tracepoint {category}:{name}"),
        reason: e.to_string(),
    })?;
    Ok(())
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), Error> {
    let tp: &mut RawTracePoint = program(ebpf, prog)?;
    tp.load().map_err(|e| load_error(prog, e))?;
    if let Err(e) = tp.attach(name) {
        // Unload so the fallback's program is the only one left for this hook.
        let _ = tp.unload();
        return Err(Error::Attach {
            what: format!("raw tracepoint {name}"),
            reason: e.to_string(),
        });
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Can this process load and attach the programs? The effective capabilities decide, not the
/// uid: CAP_SYS_ADMIN, or CAP_BPF together with CAP_PERFMON (kernels since 5.8).
fn check_root() -> Result<(), Error> {
    // Bit numbers from capability(7).
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        });
    let allowed = match effective {
        Some(caps) => {
            let has = |cap: u32| caps & (1u64 << cap) != 0;
            has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
        }
        // No /proc to ask: fall back to the uid.
        // SAFETY: geteuid has no preconditions and cannot fail.
        None => (unsafe { libc::geteuid() }) == 0,
    };
    if allowed {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

fn raise_memlock_rlimit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct is passed by pointer; failure only matters on kernels that
    // still charge BPF maps to RLIMIT_MEMLOCK, where loading reports its own error.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

impl Tracer {
    pub fn load(opts: TracerOptions) -> Result<Self, Error> {
        check_root()?;
        let tracefs = tracefs::ensure_mounted()?;
        tracefs::check_layout(&tracefs)?;
        raise_memlock_rlimit();

        let config = Config {
            filter_pids: opts.filter_pids as u32,
            capture_stacks: opts.capture_stacks as u32,
            stack_cache: opts.stack_cache as u32,
            exclude_tgid: std::process::id(),
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Load(format!("{e:#}")))?;

        let mut attach_methods = Vec::new();
        for (prog, category, name) in TRACEPOINTS {
            let method = match RAW_TRACEPOINTS.iter().find(|(_, tp)| tp == name) {
                Some((raw_prog, _)) if !opts.classic_tracepoints => {
                    match attach_raw_tracepoint(&mut ebpf, raw_prog, name) {
                        Ok(()) => AttachMethod::RawTracepoint,
                        Err(e) => {
                            attach_tracepoint(&mut ebpf, prog, category, name)?;
                            AttachMethod::TracepointAfterRawFailed(e.to_string())
                        }
                    }
                }
                _ => {
                    attach_tracepoint(&mut ebpf, prog, category, name)?;
                    AttachMethod::Tracepoint
                }
            };
            attach_methods.push((format!("{category}:{name}"), method));
        }
        let cpus = aya::util::online_cpus().map_err(|(what, e)| Error::Attach {
            what: "perf events".into(),
            reason: format!("{what}: {e}"),
        })?;
        for (prog, event) in PERF_EVENTS {
            let pe: &mut PerfEvent = program(&mut ebpf, prog)?;
            pe.load().map_err(|e| load_error(prog, e))?;
            for &cpu in &cpus {
                pe.attach(
                    PerfEventConfig::Software(*event),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(1),
                    false,
                )
                .map_err(|e| Error::Attach {
                    what: format!("perf software event {event:?} on cpu {cpu}"),
                    reason: e.to_string(),
                })?;
            }
            attach_methods.push((
                format!("perf software event {event:?}"),
                AttachMethod::PerfEventPerCpu(cpus.len()),
            ));
        }

        let events = RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?).map_err(map_error)?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?).map_err(map_error)?;
        let targets = HashMap::try_from(take_map(&mut ebpf, "TARGETS")?).map_err(map_error)?;
        let targets_generation =
            Array::try_from(take_map(&mut ebpf, "TARGETS_GENERATION")?).map_err(map_error)?;

        Ok(Self {
            _ebpf: ebpf,
            events: Some(events),
            counters,
            targets,
            targets_generation,
            attach_methods,
        })
    }

    /// Adds a process to trace (with `filter_pids`).
    pub fn add_target(&mut self, pid: u32) -> Result<(), Error> {
        self.targets
            .insert(pid, 1, 0)
            .map_err(|e| Error::Map(format!("adding pid {pid} to the target map: {e}")))?;
        // After the insert, so no CPU keeps a "not a target" answer for this pid. A timestamp
        // from the kernel programs' clock, like theirs, so no two changes write the same value.
        self.targets_generation
            .set(0, monotonic_ns(), 0)
            .map_err(|e| Error::Map(format!("bumping the target-map generation: {e}")))
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |idx: u32| -> u64 {
            self.counters
                .get(&idx, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            ringbuf_full_fault: sum(counter::RINGBUF_FULL_FAULT),
            ringbuf_full_other: sum(counter::RINGBUF_FULL_OTHER),
            user_stack_lost: sum(counter::USER_STACK_LOST),
            kernel_stack_lost: sum(counter::KERNEL_STACK_LOST),
            entry_missed: sum(counter::ENTRY_MISSED),
            pending_full: sum(counter::PENDING_FULL),
            targets_full: sum(counter::TARGETS_FULL),
            stack_cache_hits: sum(counter::STACK_CACHE_HITS),
            syscall_pending_full: sum(counter::SYSCALL_PENDING_FULL),
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Load(format!("program {name} missing from the eBPF object")))?;
    prog.try_into()
        .map_err(|_| Error::Load(format!("program {name} has an unexpected type")))
}

fn load_error(prog: &str, e: aya::programs::ProgramError) -> Error {
    Error::Load(format!("program {prog}: {e:#}"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::Load(format!("map {name} missing from the eBPF object")))
}

fn map_error(e: aya::maps::MapError) -> Error {
    Error::Map(e.to_string())
}
