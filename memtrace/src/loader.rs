//! Loading the kernel programs, attaching them, and the agent's handles on their maps.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy},
        PerfEvent, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use memtrace_common::{counter, Config, OFFSET_UNKNOWN};

use crate::{
    btf::{self, Btf},
    hooks::{self, Hook, HookGroup, HookPoint, PerfPeriod},
    perf::SampledEvent,
    ring::Ring,
    tracefs, Error,
};

/// The compiled kernel programs, embedded at build time by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memtrace"));

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
    /// Sizes of the slab maps (left at their minimum unless the slab hooks are loaded).
    pub slab: SlabOptions,
    /// mmap, mremap and brk records carry the caller's user stack (`memtrace vma`).
    pub vma_stacks: bool,
    /// Fault records at entry ([`crate::hooks::FAULTS_AT_ENTRY`]) where the kernel allows;
    /// false: at the kernel's accounting ([`crate::hooks::FAULTS`]), as before.
    pub faults_at_entry: bool,
    /// With records at entry: the minor-fault completion event runs on one minor fault in
    /// this many (their latency is a sample); 1: every minor fault; 0: not attached.
    pub latency_period: u32,
}

/// The slab analysis's maps and kernel-side options.
#[derive(Clone, Copy, Debug)]
pub struct SlabOptions {
    /// Outstanding objects tracked at most.
    pub max_tracked: u32,
    /// Distinct (call site, cache) allocation counters.
    pub max_sites: u32,
    /// Distinct stacks kept at most (0: no stacks).
    pub max_stacks: u32,
    /// Capture kernel stacks; user stacks of the allocating task.
    pub kernel_stacks: bool,
    pub user_stacks: bool,
}

impl SlabOptions {
    /// No slab tracing: every slab map at its smallest.
    pub const OFF: SlabOptions = SlabOptions {
        max_tracked: 1,
        max_sites: 1,
        max_stacks: 0,
        kernel_stacks: false,
        user_stacks: false,
    };
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            filter_pids: false,
            capture_stacks: true,
            stack_cache: true,
            ringbuf_bytes: 16 * 1024 * 1024,
            classic_tracepoints: false,
            slab: SlabOptions::OFF,
            vma_stacks: false,
            faults_at_entry: true,
            latency_period: DEFAULT_LATENCY_PERIOD,
        }
    }
}

/// One minor fault in this many has its latency measured by default (a prime: a fault pattern
/// that repeats every 2, 4, 8, ... faults cannot line up with the sample).
pub const DEFAULT_LATENCY_PERIOD: u32 = 61;

/// Where the fault path sends its records, as attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultRecords {
    /// Not traced (no faults group loaded).
    None,
    /// At each fault's entry; minor-fault latency measured on one fault in `latency_period`
    /// (0: none), major faults' on every one.
    AtEntry { latency_period: u32 },
    /// At the kernel's accounting: every fault's latency.
    AtAccounting,
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
    pub syscall_pending_full: u64,
    /// Mapping syscalls whose saved user registers were not found.
    pub syscall_args_unread: u64,
}

/// Loaded and attached kernel programs.
pub struct Tracer {
    // Keeps programs and links alive for as long as the tracer lives.
    ebpf: Ebpf,
    pub events: Option<Ring>,
    counters: PerCpuArray<MapData, u64>,
    targets: HashMap<MapData, u32, u8>,
    targets_generation: Array<MapData, u64>,
    /// How each hook got attached, for `memtrace check`.
    pub attach_methods: Vec<(String, AttachMethod)>,
    /// Optional hooks that could not attach, and what the run goes without.
    pub degraded: Vec<Degraded>,
    /// How page faults are recorded, as attached.
    pub fault_records: FaultRecords,
    /// The minor-fault completion events of the latency sample, when attached.
    latency_events: Option<LatencyEvents>,
}

/// The minor-fault completion events of the latency sample.
struct LatencyEvents {
    /// Open while measuring: always without windows, during a window with them.
    events: Option<SampledEvent>,
    /// What opens them: the software event's number, the CPUs, the loaded program.
    config: u64,
    cpus: Vec<u32>,
    prog_fd: std::os::fd::RawFd,
    /// The period drawn around: the configured one, or the one in a window.
    period: u32,
    windows: Option<LatencyWindows>,
    /// The programs' copy of the current window's end, so samples stop on time even when
    /// this agent closes the window late.
    window_end: Option<Array<MapData, u64>>,
    /// When the current cycle began, and when the events open or close next.
    cycle_start: std::time::Instant,
    next_change: std::time::Instant,
    /// xorshift state.
    draw: u64,
}

impl LatencyEvents {
    /// Opens the events at `period` (enabled at once without windows; in windows, opened once
    /// to check they can be, then closed until the first window).
    fn open(
        config: u64,
        period: u32,
        cpus: &[u32],
        prog_fd: std::os::fd::RawFd,
    ) -> std::io::Result<Self> {
        let windows = LatencyWindows::for_period(period);
        let in_window = windows.map_or(period, |w| w.period_in_window);
        let events = SampledEvent::attach(config, u64::from(in_window), cpus, prog_fd)?;
        Ok(Self {
            events: windows.is_none().then_some(events),
            config,
            cpus: cpus.to_vec(),
            prog_fd,
            period: in_window,
            windows,
            window_end: None,
            cycle_start: std::time::Instant::now(),
            next_change: std::time::Instant::now(),
            draw: monotonic_ns() | 1,
        })
    }

    /// xorshift64: no quality needed beyond not repeating with the faults' patterns.
    fn next_draw(&mut self) -> u64 {
        self.draw ^= self.draw << 13;
        self.draw ^= self.draw >> 7;
        self.draw ^= self.draw << 17;
        self.draw
    }

    /// A period drawn so that the sampling rate is uniform in [0.5/P, 1.5/P) around one in
    /// P: no periodic pattern of faults lines up with the sample for long, and the mean rate
    /// stays one in P.
    fn draw_period(&mut self) -> u64 {
        let p = u64::from(self.period);
        if p < 4 {
            return p;
        }
        let draw = self.next_draw();
        (p << 16) / ((1 << 15) + draw % (1 << 16))
    }
}

/// How often [`Tracer::latency_tick`] wants to be called.
pub const LATENCY_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Minor-fault latency measured in windows: the completion events exist for one random
/// [`LATENCY_TICK`] of every `ticks_per_cycle`, at a period that many times shorter. While any
/// minor-fault perf event exists, even disabled, every fault's accounting enters the kernel's
/// software-event code (~3% of the cheapest fault here), so the events are opened for a window
/// and closed after it: the samples per fault stay one in P on average. Windows of 10 ms in
/// every 100 ms, so that a command running a fraction of a second is still measured several
/// times (each opening and closing flips the kernel's static key for the event: 20 a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LatencyWindows {
    /// A window's length, and one window in every `cycle_ms`.
    pub window_ms: u64,
    pub cycle_ms: u64,
    /// The mean period while a window is open.
    pub period_in_window: u32,
}

impl LatencyWindows {
    /// Windows for a configured period of `period`, if it is long enough to be split (a
    /// window's period must stay above a few faults).
    pub fn for_period(period: u32) -> Option<Self> {
        const CYCLE: u64 = 10;
        let window_ms = LATENCY_TICK.as_millis() as u64;
        (period >= 4 * CYCLE as u32).then(|| Self {
            window_ms,
            cycle_ms: window_ms * CYCLE,
            period_in_window: period / CYCLE as u32,
        })
    }
}

/// An optional hook left out: the run goes on without what it gives.
#[derive(Clone, Debug)]
pub struct Degraded {
    pub hook: String,
    pub reason: String,
    pub without: &'static str,
}

impl std::fmt::Display for Degraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unavailable ({}): {}",
            self.hook, self.reason, self.without
        )
    }
}

/// How a hook is attached, chosen by trying the cheapest kind first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachMethod {
    /// A BTF-typed raw tracepoint: pointer arguments are read with plain loads.
    BtfTracepoint,
    /// `BPF_RAW_TRACEPOINT_OPEN`: the program gets the tracepoint's arguments directly.
    RawTracepoint,
    /// A classic tracepoint (perf event + trace record) because raw ones are not allowed.
    TracepointAfterRawFailed(String),
    /// A classic tracepoint, by configuration or because no raw program exists for it.
    Tracepoint,
    /// A sampling software perf event on each of `cpus` CPUs, running its program on one
    /// event in `period`.
    PerfEventPerCpu { cpus: usize, period: u32 },
    /// Left out by configuration (`--counts-only`).
    NotAttached(&'static str),
}

impl std::fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BtfTracepoint => f.write_str("BTF tracepoint"),
            Self::RawTracepoint => f.write_str("raw tracepoint"),
            Self::TracepointAfterRawFailed(why) => {
                write!(f, "tracepoint (raw tracepoint refused: {why})")
            }
            Self::Tracepoint => f.write_str("tracepoint"),
            Self::PerfEventPerCpu { cpus, period } => {
                write!(f, "perf event, period {period}, on each of {cpus} CPUs")
            }
            Self::NotAttached(why) => write!(f, "not attached: {why}"),
        }
    }
}

fn attach_tracepoint(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<(), Error> {
    let tp: &mut TracePoint = program(ebpf, prog)?;
    tp.load().map_err(|e| load_error(prog, e))?;
    tp.attach(category, name).map_err(|e| Error::Attach {
        what: format!("tracepoint {category}:{name}"),
        reason: e.to_string(),
    })?;
    Ok(())
}

fn attach_raw_tracepoint(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<AttachMethod, Error> {
    // A BTF-typed twin (`x_btf` for `x_raw`) reads pointer arguments with plain loads: tried
    // first where there is one.
    if let Some(btf_prog) = prog.strip_suffix("_raw").map(|p| format!("{p}_btf")) {
        if ebpf.program(&btf_prog).is_some() {
            match attach_btf_tracepoint(ebpf, &btf_prog, name) {
                Ok(()) => return Ok(AttachMethod::BtfTracepoint),
                Err(e) => log::info!("{btf_prog}: {e}; the raw tracepoint instead"),
            }
        }
    }
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
    Ok(AttachMethod::RawTracepoint)
}

fn attach_btf_tracepoint(ebpf: &mut Ebpf, prog: &str, name: &str) -> Result<(), Error> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| Error::Load(format!("kernel BTF: {e}")))?;
    let tp: &mut aya::programs::BtfTracePoint = program(ebpf, prog)?;
    tp.load(name, &btf).map_err(|e| load_error(prog, e))?;
    if let Err(e) = tp.attach() {
        let _ = tp.unload();
        return Err(Error::Attach {
            what: format!("BTF tracepoint {name}"),
            reason: e.to_string(),
        });
    }
    Ok(())
}

/// Attaches one hook the cheapest way this kernel allows: a raw tracepoint where there is a
/// program for one, else a classic tracepoint (its record layout checked first), and perf
/// software events on every CPU.
fn attach_hook(
    ebpf: &mut Ebpf,
    tracefs: &Path,
    hook: &Hook,
    opts: &TracerOptions,
    cpus: &[u32],
    btf: &mut Option<Result<Btf, String>>,
    latency_events: &mut Option<LatencyEvents>,
) -> Result<AttachMethod, Error> {
    match hook.point {
        HookPoint::Tracepoint {
            category,
            name,
            raw,
            raw_args,
        } => {
            let mut raw_refused = None;
            if let Some(raw_prog) = raw.filter(|_| !opts.classic_tracepoints) {
                // A raw program reads arguments by position: only where the kernel's BTF says
                // they are what it expects.
                let mismatch = if raw_args.is_empty() {
                    None
                } else {
                    match btf.get_or_insert_with(Btf::from_sys_fs) {
                        Ok(btf) => btf::check_raw_args(btf, name, raw_args),
                        Err(e) => Some(format!("arguments not checked: {e}")),
                    }
                };
                let attached = match mismatch {
                    Some(why) => Err(why),
                    None => attach_raw_tracepoint(ebpf, raw_prog, name).map_err(|e| e.to_string()),
                };
                match attached {
                    Ok(method) => return Ok(method),
                    Err(e) => raw_refused = Some(e),
                }
            }
            if hook.program.is_empty() {
                return Err(Error::Attach {
                    what: format!("raw tracepoint {name}"),
                    reason: raw_refused.unwrap_or_else(|| "raw tracepoints not used".into()),
                });
            }
            tracefs::check_tracepoint_layout(tracefs, category, name)?;
            attach_tracepoint(ebpf, hook.program, category, name)?;
            Ok(raw_refused.map_or(
                AttachMethod::Tracepoint,
                AttachMethod::TracepointAfterRawFailed,
            ))
        }
        HookPoint::BtfTracepoint { name, .. } => {
            attach_btf_tracepoint(ebpf, hook.program, name)?;
            Ok(AttachMethod::BtfTracepoint)
        }
        HookPoint::PerfSoftware { event, period, .. } => {
            let period = match period {
                PerfPeriod::Every => 1,
                PerfPeriod::LatencySample => opts.latency_period,
            };
            if period == 0 {
                return Ok(AttachMethod::NotAttached(
                    "no minor-fault latency asked for",
                ));
            }
            let pe: &mut PerfEvent = program(ebpf, hook.program)?;
            pe.load().map_err(|e| load_error(hook.program, e))?;
            if let HookPoint::PerfSoftware {
                config,
                period: PerfPeriod::LatencySample,
                ..
            } = hook.point
            {
                // Opened here, not by aya, to keep the fds: the period is re-drawn as it runs,
                // and in windows the events exist only a tenth of the time.
                let prog_fd = pe.fd().map_err(|e| load_error(hook.program, e))?;
                let events = LatencyEvents::open(config, period, cpus, prog_fd.as_fd().as_raw_fd())
                    .map_err(|e| Error::Attach {
                        what: format!("perf software event {event:?}"),
                        reason: e.to_string(),
                    })?;
                *latency_events = Some(events);
                return Ok(AttachMethod::PerfEventPerCpu {
                    cpus: cpus.len(),
                    period,
                });
            }
            for &cpu in cpus {
                pe.attach(
                    PerfEventConfig::Software(event),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(u64::from(period)),
                    false,
                )
                .map_err(|e| Error::Attach {
                    what: format!("perf software event {event:?} on cpu {cpu}"),
                    reason: e.to_string(),
                })?;
            }
            Ok(AttachMethod::PerfEventPerCpu {
                cpus: cpus.len(),
                period,
            })
        }
    }
}

/// Attaches a group's hooks; an optional hook that cannot attach goes to `degraded`.
#[allow(clippy::too_many_arguments)]
fn attach_group(
    ebpf: &mut Ebpf,
    tracefs: &Path,
    group: &HookGroup,
    opts: &TracerOptions,
    cpus: &[u32],
    btf: &mut Option<Result<Btf, String>>,
    attach_methods: &mut Vec<(String, AttachMethod)>,
    degraded: &mut Vec<Degraded>,
    latency_events: &mut Option<LatencyEvents>,
) -> Result<(), Error> {
    for hook in group.hooks {
        match attach_hook(ebpf, tracefs, hook, opts, cpus, btf, latency_events) {
            Ok(method) => attach_methods.push((hook.describe(), method)),
            Err(e) if hook.optional => degraded.push(Degraded {
                hook: hook.describe(),
                reason: e.to_string(),
                without: hook.without,
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Detaches and unloads a program, whatever its kind, if it was loaded.
fn unload(ebpf: &mut Ebpf, name: &str) {
    use aya::programs::Program;
    let result = match ebpf.program_mut(name) {
        Some(Program::BtfTracePoint(p)) => p.unload(),
        Some(Program::PerfEvent(p)) => p.unload(),
        Some(Program::RawTracePoint(p)) => p.unload(),
        Some(Program::TracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = result {
        log::debug!("unloading {name}: {e}");
    }
}

/// Offsets in `struct task_struct` of `pid`, `tgid`, `min_flt`, `maj_flt` and
/// `pagefault_disabled`, when BTF has all five.
fn task_fault_offsets(btf: &Btf) -> Option<[u32; 5]> {
    let off = |member| btf.member_offset("task_struct", member);
    Some([
        off("pid")?,
        off("tgid")?,
        off("min_flt")?,
        off("maj_flt")?,
        off("pagefault_disabled")?,
    ])
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
/// Can this process load eBPF programs (root, or the capabilities)?
pub fn check_root() -> Result<(), Error> {
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
    /// Loads the kernel programs and attaches those of `groups`, and only those: an analysis
    /// never depends on hooks it does not use. A hook marked optional that cannot attach is
    /// listed in [`Tracer::degraded`] instead of failing the load.
    pub fn load(opts: TracerOptions, groups: &[&HookGroup]) -> Result<Self, Error> {
        check_root()?;
        let tracefs = tracefs::ensure_mounted()?;
        raise_memlock_rlimit();

        let slab = groups.iter().any(|g| g.name == crate::hooks::SLAB.name);
        let slab_opts = if slab { opts.slab } else { SlabOptions::OFF };
        // BTF is read only when something needs it, and only once.
        let mut btf = None;
        let offsets = if slab {
            kmem_cache_offsets(btf.get_or_insert_with(Btf::from_sys_fs))
        } else {
            [OFFSET_UNKNOWN; 3]
        };
        // A syscall's saved user registers are found from task_struct.stack (for the classic
        // syscall tracepoints, which do not pass them).
        let task_stack_off = if opts.vma_stacks {
            match btf.get_or_insert_with(Btf::from_sys_fs) {
                Ok(btf) => btf
                    .member_offset("task_struct", "stack")
                    .unwrap_or(OFFSET_UNKNOWN),
                Err(_) => OFFSET_UNKNOWN,
            }
        } else {
            OFFSET_UNKNOWN
        };
        // Fault records at entry read the current task's ids and fault counts at offsets from
        // the kernel's BTF; without all of them, faults are recorded at the accounting.
        let wants_faults = groups.iter().any(|g| g.name == hooks::FAULTS.name);
        let task_offsets = if wants_faults && opts.faults_at_entry && !opts.classic_tracepoints {
            match btf.get_or_insert_with(Btf::from_sys_fs) {
                Ok(btf) => task_fault_offsets(btf),
                Err(e) => {
                    log::info!("kernel BTF: {e}; faults recorded at the kernel's accounting");
                    None
                }
            }
        } else {
            None
        };
        let [task_pid_off, task_tgid_off, task_min_flt_off, task_maj_flt_off, task_pagefault_disabled_off] =
            task_offsets.unwrap_or([OFFSET_UNKNOWN; 5]);
        let buckets = memtrace_common::slab_buckets_for(slab_opts.max_tracked);
        let config = Config {
            slab_bucket_mask: buckets - 1,
            filter_pids: opts.filter_pids as u32,
            capture_stacks: opts.capture_stacks as u32,
            stack_cache: opts.stack_cache as u32,
            exclude_tgid: std::process::id(),
            slab_kernel_stacks: (slab_opts.max_stacks > 0 && slab_opts.kernel_stacks) as u32,
            slab_user_stacks: (slab_opts.max_stacks > 0 && slab_opts.user_stacks) as u32,
            kmem_cache_name_off: offsets[0],
            kmem_cache_object_size_off: offsets[1],
            kmem_cache_size_off: offsets[2],
            vma_stacks: opts.vma_stacks as u32,
            task_stack_off,
            task_pid_off,
            task_tgid_off,
            task_min_flt_off,
            task_maj_flt_off,
            task_pagefault_disabled_off,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .map_max_entries("SLAB_KEYS", buckets)
            .map_max_entries("SLAB_RECORDS", buckets)
            .map_max_entries("SLAB_SITES", slab_opts.max_sites.max(1))
            .map_max_entries("SLAB_STACKS", slab_opts.max_stacks.max(1))
            .load(EBPF_OBJECT)
            .map_err(|e| Error::Load(format!("{e:#}")))?;

        let cpus = aya::util::online_cpus().map_err(|(what, e)| Error::Attach {
            what: "perf events".into(),
            reason: format!("{what}: {e}"),
        })?;
        let mut attach_methods = Vec::new();
        let mut degraded = Vec::new();
        let mut fault_records = FaultRecords::None;
        let mut latency_events = None;
        for &group in groups {
            if group.name == hooks::FAULTS.name && task_offsets.is_some() {
                let mut attached = Vec::new();
                match attach_group(
                    &mut ebpf,
                    &tracefs,
                    &hooks::FAULTS_AT_ENTRY,
                    &opts,
                    &cpus,
                    &mut btf,
                    &mut attached,
                    &mut degraded,
                    &mut latency_events,
                ) {
                    Ok(()) => {
                        attach_methods.append(&mut attached);
                        // No minor completions (not asked for, or not attached): no minor
                        // latency at all.
                        let latency_period =
                            latency_events.as_ref().map_or(0, |_| opts.latency_period);
                        fault_records = FaultRecords::AtEntry { latency_period };
                        continue;
                    }
                    Err(e) => {
                        // Detach what did attach; the accounting hooks take over.
                        latency_events = None;
                        for hook in hooks::FAULTS_AT_ENTRY.hooks {
                            unload(&mut ebpf, hook.program);
                        }
                        degraded.retain(|d| {
                            !hooks::FAULTS_AT_ENTRY
                                .hooks
                                .iter()
                                .any(|h| h.describe() == d.hook)
                        });
                        log::info!("fault records at entry: {e}; at the kernel's accounting");
                        attach_methods.push((
                            "fault records at entry".to_string(),
                            AttachMethod::NotAttached("refused; at the kernel's accounting"),
                        ));
                    }
                }
            }
            if group.name == hooks::FAULTS.name {
                fault_records = FaultRecords::AtAccounting;
            }
            attach_group(
                &mut ebpf,
                &tracefs,
                group,
                &opts,
                &cpus,
                &mut btf,
                &mut attach_methods,
                &mut degraded,
                &mut latency_events,
            )?;
        }

        let events = match take_map(&mut ebpf, "EVENTS")? {
            Map::RingBuf(data) => Ring::new(data)?,
            _ => return Err(Error::Map("map EVENTS is not a ring buffer".into())),
        };
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?).map_err(map_error)?;
        let targets = HashMap::try_from(take_map(&mut ebpf, "TARGETS")?).map_err(map_error)?;
        let targets_generation =
            Array::try_from(take_map(&mut ebpf, "TARGETS_GENERATION")?).map_err(map_error)?;
        if let Some(l) = latency_events.as_mut().filter(|l| l.windows.is_some()) {
            l.window_end = Some(
                Array::try_from(take_map(&mut ebpf, "LATENCY_WINDOW_END")?).map_err(map_error)?,
            );
        }

        Ok(Self {
            ebpf,
            events: Some(events),
            counters,
            targets,
            targets_generation,
            attach_methods,
            degraded,
            fault_records,
            latency_events,
        })
    }

    /// The latency sample's windows, when the events are on only part of the time.
    pub fn latency_windows(&self) -> Option<LatencyWindows> {
        self.latency_events.as_ref().and_then(|l| l.windows)
    }

    /// Moves the minor-fault latency sample on: call it every [`LATENCY_TICK`] or so. In
    /// windows, opens the events at a random point of each cycle (at once for the first, so a
    /// short command is measured too) and closes them once a window's time has passed, with a
    /// period drawn afresh each time; without windows, draws the period again once a cycle.
    /// Windows go by the clock, not by calls: a late call makes a window longer, never shorter.
    pub fn latency_tick(&mut self) {
        let Some(l) = self.latency_events.as_mut() else {
            return;
        };
        let now = std::time::Instant::now();
        let Some(w) = l.windows else {
            if now >= l.next_change {
                l.next_change = now + LATENCY_TICK * 10;
                let period = l.draw_period();
                if let Some(Err(e)) = l.events.as_ref().map(|e| e.set_period(period)) {
                    log::debug!("latency sample period: {e}");
                }
            }
            return;
        };
        if now < l.next_change {
            return;
        }
        let window = std::time::Duration::from_millis(w.window_ms);
        let cycle = std::time::Duration::from_millis(w.cycle_ms);
        if l.events.take().is_some() {
            // Closed: the next window opens at a random point of the next cycle. Cycles keep
            // their own clock (a late close does not push them back), and one that has passed
            // while this agent was busy is skipped.
            l.cycle_start += cycle;
            while l.cycle_start + cycle <= now {
                l.cycle_start += cycle;
            }
            let slots = w.cycle_ms / w.window_ms;
            l.next_change = l.cycle_start + window * (l.next_draw() % slots) as u32;
            return;
        }
        let period = l.draw_period();
        if let Some(end) = l.window_end.as_mut() {
            let _ = end.set(0, monotonic_ns() + window.as_nanos() as u64, 0);
        }
        match SampledEvent::attach(l.config, period, &l.cpus, l.prog_fd) {
            Ok(events) => l.events = Some(events),
            Err(e) => log::debug!("latency sample window: {e}"),
        }
        l.next_change = now + window;
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

    /// Takes one of the kernel programs' maps, for an analysis that reads it at report time.
    pub fn take_map(&mut self, name: &str) -> Result<Map, Error> {
        take_map(&mut self.ebpf, name)
    }

    /// How often the kernel skipped program `name` because it was already running on that CPU
    /// (`recursion_misses` of its bpf_prog_info); `None` if it is not loaded or the kernel
    /// does not say.
    pub fn recursion_misses(&self, name: &str) -> Option<u64> {
        let fd = self.ebpf.program(name)?.fd().ok()?;
        prog_recursion_misses(fd.as_fd().as_raw_fd())
    }

    /// One counter (an index in `memtrace_common::counter`) summed over CPUs.
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |idx: u32| self.counter(idx);
        KernelCounters {
            ringbuf_full_fault: sum(counter::RINGBUF_FULL_FAULT),
            ringbuf_full_other: sum(counter::RINGBUF_FULL_OTHER),
            user_stack_lost: sum(counter::USER_STACK_LOST),
            kernel_stack_lost: sum(counter::KERNEL_STACK_LOST),
            entry_missed: sum(counter::ENTRY_MISSED),
            pending_full: sum(counter::PENDING_FULL),
            targets_full: sum(counter::TARGETS_FULL),
            syscall_pending_full: sum(counter::SYSCALL_PENDING_FULL),
            syscall_args_unread: sum(counter::SYSCALL_ARGS_UNREAD),
        }
    }
}

/// The `bpf(2)` system call with `cmd` and `attr`, for the commands aya does not offer.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `cmd` reads, and every pointer in it must be
/// valid for what the kernel reads or writes there.
pub(crate) unsafe fn bpf_syscall<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: per the function contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `recursion_misses` from `BPF_OBJ_GET_INFO_BY_FD` on a program (kernels since 5.12).
fn prog_recursion_misses(fd: std::os::fd::RawFd) -> Option<u64> {
    /// `BPF_OBJ_GET_INFO_BY_FD`, and where `struct bpf_prog_info` keeps `recursion_misses`.
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const RECURSION_MISSES_AT: usize = 208;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; 256];
    let mut attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is the `info` member of `union bpf_attr` and points at a buffer of
    // `info_len` bytes that outlives the call; the kernel writes at most that many.
    let done = unsafe { bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr) };
    if done.is_err() || (attr.info_len as usize) < RECURSION_MISSES_AT + 8 {
        return None;
    }
    let bytes = info.get(RECURSION_MISSES_AT..RECURSION_MISSES_AT + 8)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Where `struct kmem_cache` keeps `name`, `object_size` and `size` on this kernel, from its
/// BTF; unknown offsets leave caches unnamed (said in every report) rather than failing.
fn kmem_cache_offsets(btf: &Result<Btf, String>) -> [u32; 3] {
    let Ok(btf) = btf else {
        return [OFFSET_UNKNOWN; 3];
    };
    ["name", "object_size", "size"].map(|field| {
        btf.member_offset("kmem_cache", field)
            .unwrap_or(OFFSET_UNKNOWN)
    })
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
