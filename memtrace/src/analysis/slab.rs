//! `memtrace slab`: outstanding kernel slab objects by callsite, cache, process or stack.
//!
//! The kernel side keeps the outstanding objects and per-callsite allocation counts in maps;
//! the ring buffer carries only process records (names, children of a traced command). A
//! report reads the maps in bulk, folds them ([`crate::slab::Aggregate`]) and compares each
//! cache with /proc/slabinfo.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use memtrace_common::{
    counter, is_kmalloc_cache_id, is_other_memory_id, ProcRecord, SlabCacheInfo, SlabSiteCounts,
    SlabSiteKey, SlabSiteSlot, SlabStack, PAGES_CACHE_ID, PERCPU_CACHE_ID, PROC_EXEC, PROC_EXIT,
    PROC_FORK, SLAB_SITE_SLOT_COUNT,
};

use crate::{
    engine::{process_alive, Analysis, ReportContext, ReportKind, DRAIN_BATCH},
    hooks::{self, HookGroup},
    ksyms::Kallsyms,
    loader::Tracer,
    record::{self, Record},
    report::{AgentStats, Format, Loss, LostReport, Scope},
    ring::Ring,
    sideband::monotonic_ns,
    slab::{
        caches::{self, AliasGroups, SlabinfoRow},
        outstanding,
        report::{age_histogram, CacheReport, GroupReport, Totals},
        Aggregate, CacheAcc, Fold, GroupBy, GroupKey, SlabReport,
    },
    Error,
};

/// What `memtrace slab` shows.
#[derive(Clone, Debug)]
pub struct SlabReportOptions {
    pub by: GroupBy,
    pub min_age: Option<Duration>,
    /// Only these caches (by name or alias); empty for all.
    pub caches: Vec<String>,
    pub top: usize,
    pub format: Format,
    /// Kernel stacks; user stacks of the allocating tasks.
    pub stacks: bool,
    pub user_stacks: bool,
    pub max_tracked: u32,
    /// Also track page, per-CPU and vmalloc allocations.
    pub pages: bool,
    pub percpu: bool,
    pub vmalloc: bool,
}

/// Where a thread's user stack begins (`function+0xoff (module)`): `_start` and libc's
/// `main` caller for the main thread, the clone entries for the others.
pub(crate) fn is_thread_entry(frame: &str) -> bool {
    const ENTRIES: &[&str] = &[
        "_start",
        "__libc_start_call_main",
        "__libc_start_main",
        "__libc_start_main_impl",
        "start_thread",
        "clone",
        "__clone",
        "clone3",
        "__clone3",
        "thread_start",
    ];
    let name = frame.split('+').next().unwrap_or(frame);
    ENTRIES.contains(&name)
}

/// A user stack as text, innermost first, and whether the walk was cut.
type UserFrames = (Vec<String>, bool);

/// User addresses to `function+0xoff (file)`, through the memory maps of a process that
/// allocated there (blazesym reads them from /proc). A process gone by report time leaves its
/// frames as addresses.
#[derive(Default)]
struct UserSymbols {
    /// `None`: not code (where a walk through code without frame pointers ends).
    cache: HashMap<(u32, u64), Option<String>>,
}

impl UserSymbols {
    /// Symbolized entries kept between reports, at most.
    const MAX_CACHED: usize = 65_536;

    /// `ips` as frames, and whether the walk was cut: frame-pointer walks through code built
    /// without frame pointers read stack data as return addresses, and a frame after the first
    /// that is not in a mapped file (heap, stack, nothing at all) ends the stack there.
    fn describe(&mut self, pid: u32, ips: &[u64]) -> UserFrames {
        use blazesym::symbolize::{
            source::Process, source::Source, Input, Reason, Symbolized, Symbolizer,
        };
        let missing: Vec<u64> = ips
            .iter()
            .copied()
            .filter(|ip| !self.cache.contains_key(&(pid, *ip)))
            .collect();
        if !missing.is_empty() {
            if self.cache.len() > Self::MAX_CACHED {
                self.cache.clear();
            }
            let src = Source::Process(Process::new(pid.into()));
            // Symbol tables only: rows print function+offset, and parsing DWARF (libc6-dbg's
            // is large) held up the first report by half a second.
            let symbolizer = Symbolizer::builder()
                .enable_code_info(false)
                .enable_inlined_fns(false)
                .build();
            let found = symbolizer
                .symbolize(&src, Input::AbsAddr(&missing))
                .unwrap_or_default();
            for (i, &ip) in missing.iter().enumerate() {
                let frame = match found.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        let module = sym
                            .module
                            .as_deref()
                            .map(|m| m.to_string_lossy())
                            .unwrap_or_default();
                        let module = module.rsplit('/').next().unwrap_or_default().to_string();
                        Some(format!("{}+0x{:x} ({module})", sym.name, sym.offset))
                    }
                    Some(Symbolized::Unknown(Reason::Unmapped | Reason::MissingComponent)) => None,
                    // Non-canonical: no user address at all.
                    _ if ip >= 1 << 47 => None,
                    _ => Some(format!("0x{ip:x}")),
                };
                self.cache.insert((pid, ip), frame);
            }
        }
        let mut frames = Vec::with_capacity(ips.len());
        for (i, ip) in ips.iter().enumerate() {
            match self.cache.get(&(pid, *ip)) {
                Some(Some(text)) => frames.push(text.clone()),
                _ if i == 0 => frames.push(format!("0x{ip:x}")),
                _ => return (frames, true),
            }
        }
        // A whole stack ends where the thread began; one that ends elsewhere stopped at a
        // caller without a frame pointer (Debian's python3: libc's socketpair, then nothing).
        let cut = frames
            .last()
            .is_some_and(|f| !f.starts_with("0x") && !is_thread_entry(f));
        (frames, cut)
    }
}

/// Kernel memory per bucket of the outstanding-object table (its keys and records).
const BUCKET_BYTES: u64 = (std::mem::size_of::<memtrace_common::SlabBucket>()
    + std::mem::size_of::<memtrace_common::SlabRecords>()) as u64;

/// The default `--max-tracked`: a million objects, or fewer on a machine with under ~13 GiB,
/// so the preallocated table (a 512-byte bucket per four objects, in a power of two of
/// buckets) stays within 1% of its memory.
/// Distinct stacks kept with `memtrace slab --stacks` or `--user-stacks` (640 bytes each).
pub const SLAB_MAX_STACKS: u32 = 16 << 10;
/// Distinct (call site, cache) allocation counters: a per-CPU map, so fewer per CPU on large
/// machines (64k on 2-16 CPUs: 3 MiB on 2; 8k on 128: 24 MiB).
pub fn slab_max_sites() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    ((1u32 << 20) / cpus.max(1)).clamp(4 << 10, 64 << 10)
}

pub fn default_max_tracked() -> u32 {
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024);
    let buckets = (mem_total / 100 / BUCKET_BYTES).clamp(1 << 12, 1 << 18);
    // The largest power of two that fits: the table is sized in powers of two anyway.
    let buckets = 1u64 << (63 - buckets.leading_zeros());
    (buckets * 4) as u32
}

/// Kernel memory the outstanding-object table takes for `--max-tracked n`.
pub fn table_bytes(max_tracked: u32) -> u64 {
    memtrace_common::slab_buckets_for(max_tracked) as u64 * BUCKET_BYTES
}

/// Checks `--cache` names against the caches this kernel has (an alias counts), and the
/// kmalloc size classes, which may have no cache of that exact name.
pub fn check_cache_names(names: &[String]) -> Result<(), String> {
    let groups = AliasGroups::read();
    for name in names {
        let other_memory = name == "percpu"
            || name == "vmalloc"
            || name
                .strip_prefix("pages-order-")
                .is_some_and(|o| o.parse::<u8>().is_ok());
        if !groups.knows(name) && name != "kmalloc-large" && !other_memory {
            return Err(format!(
                "no slab cache named '{name}' on this kernel (see /proc/slabinfo or /sys/kernel/slab)"
            ));
        }
    }
    Ok(())
}

/// The name and sizes of cache `id`, inferred for a kmalloc size class.
fn cache_meta(caches: &mut HashMap<u64, CacheMeta>, id: u64) -> &CacheMeta {
    if is_other_memory_id(id) {
        return caches.entry(id).or_insert_with(|| CacheMeta {
            placeholder: false,
            name: match id & !0xff {
                PAGES_CACHE_ID => format!("pages-order-{}", id & 0xff),
                PERCPU_CACHE_ID => "percpu".into(),
                _ => "vmalloc".into(),
            },
            inferred: false,
            object_size: 0,
            size: 0,
        });
    }
    caches.entry(id).or_insert_with(|| CacheMeta {
        placeholder: !is_kmalloc_cache_id(id),
        name: if is_kmalloc_cache_id(id) {
            caches::kmalloc_cache_name(id)
        } else {
            format!("cache@{id:x}")
        },
        inferred: is_kmalloc_cache_id(id),
        object_size: 0,
        size: if is_kmalloc_cache_id(id) {
            (id & 0xffff_ffff) as u32
        } else {
            0
        },
    })
}

/// Caches whose objects this kernel frees without any event, whatever the site: the maple
/// tree frees its nodes with kfree_rcu (through sheaves on 6.18) and kmem_cache_free_bulk,
/// also when a process's address space goes away. Without this, every process that exits
/// leaves ~50 nodes behind that look like a leak until their addresses are reused.
const CACHES_FREED_OUT_OF_SIGHT: &[&str] = &["maple_node"];

/// Does a site free out of sight? One of its objects in twenty or more was found freed by the
/// allocation of its address again (an ordinary site sees none: every free has its event).
fn frees_untraced(c: &SlabSiteCounts) -> bool {
    c.implicit_frees >= 16 && c.implicit_frees * 20 >= c.allocs
}

/// Which caches `--cache` asked for (by name or alias), decided once per cache.
struct CacheFilter<'a> {
    names: &'a [String],
    aliases: &'a AliasGroups,
    memo: HashMap<u64, bool>,
}

impl CacheFilter<'_> {
    fn wants(&mut self, caches: &mut HashMap<u64, CacheMeta>, id: u64) -> bool {
        if self.names.is_empty() {
            return true;
        }
        if let Some(&w) = self.memo.get(&id) {
            return w;
        }
        let name = &cache_meta(caches, id).name;
        let wanted = self.names.contains(name)
            || self
                .aliases
                .aliases_of(name)
                .iter()
                .any(|a| self.names.contains(a));
        self.memo.insert(id, wanted);
        wanted
    }
}

/// Objects younger than this are not growth: in flight, not held (an RCU grace period, a
/// socket buffer in transit). A leak shows in growth this much later.
const SETTLE: Duration = Duration::from_secs(1);

/// A kernel stack from the allocation on: the walk starts in memtrace's own program, the
/// tracepoint's dispatch and the allocator, which every stack shares. Cut at the call site
/// when the stack holds it, else after the tracepoint dispatch and the allocator function.
fn allocation_frames<'a>(ips: &'a [u64], call_site: Option<u64>, ksyms: &Kallsyms) -> &'a [u64] {
    if let Some(at) = call_site.and_then(|cs| ips.iter().position(|&ip| ip == cs)) {
        return &ips[at..];
    }
    let dispatch = ips.iter().take(8).rposition(|&ip| {
        ksyms
            .resolve(ip)
            .is_some_and(|(name, _)| name.starts_with("bpf_trace_run") || name.ends_with("[bpf]"))
    });
    match dispatch {
        Some(at) => ips.get(at + 2..).unwrap_or(&[]),
        None => ips,
    }
}

/// How often sites that free out of sight are looked for between reports: their objects would
/// fill the table otherwise.
const CLASSIFY_EVERY: Duration = Duration::from_secs(2);

/// How often stacks no object uses are dropped between reports.
const STACK_GC_EVERY: Duration = Duration::from_secs(30);

/// Stacks waiting for their user frames to be symbolized, at most.
const MAX_NEW_STACKS: usize = 16_384;

/// The longest a drain spends symbolizing new stacks' user frames.
const SYMBOLIZE_BUDGET: Duration = Duration::from_millis(50);

/// Process names kept at most; past this, those of exited processes go.
const MAX_COMMS: usize = 65_536;

struct SlabMaps {
    /// The outstanding-object table: addresses, and their records.
    keys: MapData,
    records: MapData,
    sites: PerCpuHashMap<MapData, SlabSiteKey, SlabSiteCounts>,
    site_slots: PerCpuArray<MapData, SlabSiteSlot>,
    caches: BpfHashMap<MapData, u64, SlabCacheInfo>,
    stacks: Option<BpfHashMap<MapData, u64, SlabStack>>,
    untracked_sites: BpfHashMap<MapData, SlabSiteKey, u8>,
    untracked_caches: BpfHashMap<MapData, u64, u8>,
    untracked_generation: aya::maps::Array<MapData, u64>,
}

/// A cache's name and sizes, as the report shows them.
#[derive(Clone, Debug)]
struct CacheMeta {
    name: String,
    /// Not read from the kernel yet (`cache@<address>`, sizes 0).
    placeholder: bool,
    inferred: bool,
    object_size: u32,
    size: u32,
}

/// What the previous report saw, for growth and interval counts.
#[derive(Default)]
struct Previous {
    /// Settled objects shown per group (see [`crate::slab::GroupAcc::settled`]).
    settled: HashMap<GroupKey, u64>,
    /// Every outstanding object per group.
    all: HashMap<GroupKey, u64>,
    sites: HashMap<SlabSiteKey, SlabSiteCounts>,
    allocs: u64,
    frees: u64,
    implicit_frees: u64,
}

pub struct SlabAnalysis {
    opts: SlabReportOptions,
    hook_groups: &'static [&'static HookGroup],
    maps: Option<SlabMaps>,
    comms: HashMap<u32, String>,
    exited: HashSet<u32>,
    /// Children forked by traced processes and not exited.
    children: HashSet<u32>,
    kallsyms: Option<Kallsyms>,
    aliases: AliasGroups,
    slabinfo_start: Result<HashMap<String, SlabinfoRow>, String>,
    caches: HashMap<u64, CacheMeta>,
    prev: Previous,
    /// Stacks read so far (kernel frames, user frames), by id.
    stack_frames: HashMap<u64, (Vec<u64>, Vec<u64>)>,
    user_symbols: UserSymbols,
    /// Stacks with user frames the kernel announced and not symbolized yet: (pid, id).
    new_stacks: Vec<(u32, u64)>,
    /// User frames symbolized when their stack was new, by stack id.
    user_text: HashMap<u64, UserFrames>,
    /// Stacks no outstanding object referred to at the last report: removed from the kernel
    /// map if still unused at the next.
    stacks_unused: HashSet<u64>,
    /// Sites whose frees the kernel does not trace (see [`SlabAnalysis::classify_sites`]).
    frees_untraced: HashSet<SlabSiteKey>,
    /// Caches in [`CACHES_FREED_OUT_OF_SIGHT`], by id.
    caches_untraced: HashSet<u64>,
    /// A site or cache was added to the kernel's untracked maps since the generation was set.
    untracked_changed: bool,
    last_classified: std::time::Instant,
    last_stack_gc: std::time::Instant,
}

impl SlabAnalysis {
    pub fn new(opts: SlabReportOptions) -> Self {
        let mut groups: Vec<&'static HookGroup> = vec![&hooks::PROCESSES, &hooks::SLAB];
        for (wanted, group) in [
            (opts.pages, &hooks::PAGES),
            (opts.percpu, &hooks::PERCPU),
            (opts.vmalloc, &hooks::VMALLOC),
        ] {
            if wanted {
                groups.push(group);
            }
        }
        Self {
            // Once per run: the engine takes the groups for the run's whole life.
            hook_groups: Vec::leak(groups),
            opts,
            maps: None,
            comms: HashMap::new(),
            exited: HashSet::new(),
            children: HashSet::new(),
            kallsyms: None,
            aliases: AliasGroups::default(),
            slabinfo_start: Err("not read yet".into()),
            caches: HashMap::new(),
            prev: Previous::default(),
            stack_frames: HashMap::new(),
            user_symbols: UserSymbols::default(),
            new_stacks: Vec::new(),
            user_text: HashMap::new(),
            stacks_unused: HashSet::new(),
            frees_untraced: HashSet::new(),
            caches_untraced: HashSet::new(),
            untracked_changed: false,
            last_classified: std::time::Instant::now(),
            last_stack_gc: std::time::Instant::now(),
        }
    }

    fn on_proc(&mut self, p: &ProcRecord) {
        match p.op {
            PROC_FORK => {
                if let Some(parent) = self.comms.get(&p.pid).cloned() {
                    self.comms.insert(p.child_pid, parent);
                }
                self.children.insert(p.child_pid);
                self.exited.remove(&p.child_pid);
            }
            PROC_EXEC => {
                self.comms.insert(p.pid, record::comm_str(&p.comm));
            }
            PROC_EXIT => {
                self.comms
                    .entry(p.pid)
                    .or_insert_with(|| record::comm_str(&p.comm));
                self.children.remove(&p.pid);
                self.exited.insert(p.pid);
            }
            _ => {}
        }
        if self.comms.len() > MAX_COMMS {
            for pid in self.exited.drain() {
                self.comms.remove(&pid);
            }
        }
    }

    fn comm(&mut self, pid: u32) -> String {
        if let Some(c) = self.comms.get(&pid) {
            return c.clone();
        }
        let c = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_else(|_| "?".into());
        if pid != 0 {
            self.comms.insert(pid, c.clone());
        }
        c
    }

    /// Names and sizes of caches the kernel recorded since the last report.
    fn refresh_caches(&mut self) {
        let Some(maps) = &self.maps else { return };
        let known: Vec<(u64, SlabCacheInfo)> = maps.caches.iter().flatten().collect();
        for (id, info) in known {
            if CACHES_FREED_OUT_OF_SIGHT
                .iter()
                .any(|n| info.name.starts_with(n.as_bytes()) && info.name.get(n.len()) == Some(&0))
                && self.caches_untraced.insert(id)
            {
                if let Some(maps) = self.maps.as_mut() {
                    let _ = maps.untracked_caches.insert(id, 1, 0);
                }
                self.untracked_changed = true;
            }
            // A cache first met in the table before its name was read has a placeholder.
            if self.caches.get(&id).is_some_and(|m| !m.placeholder) {
                continue;
            }
            let end = info
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(info.name.len());
            let name = String::from_utf8_lossy(&info.name[..end]).into_owned();
            let meta = CacheMeta {
                placeholder: name.is_empty(),
                name: if name.is_empty() {
                    format!("cache@{id:x}")
                } else {
                    name
                },
                inferred: false,
                object_size: info.object_size,
                size: info.size,
            };
            self.caches.insert(id, meta);
        }
    }

    fn cache_meta(&mut self, id: u64) -> &CacheMeta {
        cache_meta(&mut self.caches, id)
    }

    /// Allocation counts per (call site, cache), summed over CPUs: what the kernel added into
    /// `SLAB_SITES`, plus what each CPU's site slots hold. (A slot handed over between the two
    /// reads is counted by the next report.)
    fn read_sites(&self) -> HashMap<SlabSiteKey, SlabSiteCounts> {
        let mut sites: HashMap<SlabSiteKey, SlabSiteCounts> = HashMap::new();
        let Some(maps) = &self.maps else {
            return sites;
        };
        let mut add = |k: SlabSiteKey, c: &SlabSiteCounts| *sites.entry(k).or_default() += c;
        for (k, per_cpu) in maps.sites.iter().flatten() {
            for c in per_cpu.iter() {
                add(k, c);
            }
        }
        for i in 0..SLAB_SITE_SLOT_COUNT {
            if let Ok(per_cpu) = maps.site_slots.get(&i, 0) {
                for slot in per_cpu.iter().filter(|s| s.key != SlabSiteKey::default()) {
                    add(slot.key, &slot.counts);
                }
            }
        }
        sites
    }

    /// Marks sites whose objects the kernel frees out of the tracer's sight (kfree_rcu, bulk
    /// frees): their addresses come back from the allocator while still tracked. Their
    /// outstanding objects are mostly freed already, so they are kept out of groups and totals
    /// instead of showing as leaks. Returns the counts per cache.
    fn classify_sites(
        &mut self,
        sites: &HashMap<SlabSiteKey, SlabSiteCounts>,
    ) -> HashMap<u64, SlabSiteCounts> {
        let mut per_cache: HashMap<u64, SlabSiteCounts> = HashMap::new();
        for (k, c) in sites {
            *per_cache.entry(k.cache).or_default() += c;
            if frees_untraced(c) && self.frees_untraced.insert(*k) {
                if let Some(maps) = self.maps.as_mut() {
                    let _ = maps.untracked_sites.insert(k, 1, 0);
                }
                self.untracked_changed = true;
            }
        }
        per_cache
    }

    /// Finds sites (and caches) that free out of sight, and has the kernel stop tracking their
    /// objects: every CPU re-checks its site slots when the generation changes.
    fn stop_tracking_untraced(&mut self) {
        self.refresh_caches();
        let sites = self.read_sites();
        self.classify_sites(&sites);
        self.publish_untracked();
    }

    /// Has every CPU re-check its site slots if sites were added to the untracked maps (or
    /// stacks dropped) since the last call.
    fn publish_untracked(&mut self) {
        if !std::mem::take(&mut self.untracked_changed) {
            return;
        }
        if let Some(maps) = self.maps.as_mut() {
            let _ = maps.untracked_generation.set(0, monotonic_ns(), 0);
        }
    }

    /// The frames of stack `id` (kernel, then user), read from the kernel's map the first time.
    fn stack_frames(&mut self, id: u64) -> Option<&(Vec<u64>, Vec<u64>)> {
        if !self.stack_frames.contains_key(&id) {
            let stacks = self.maps.as_ref()?.stacks.as_ref()?;
            let s = stacks.get(&id, 0).ok()?;
            let live = |f: &[u64]| f.iter().copied().take_while(|&f| f != 0).collect();
            self.stack_frames
                .insert(id, (live(&s.frames[..]), live(&s.user[..])));
        }
        self.stack_frames.get(&id)
    }

    /// Symbolizes the user frames of stacks the kernel announced, while their processes still
    /// run (a process gone by report time would leave them as addresses), for at most
    /// [`SYMBOLIZE_BUDGET`] per drain.
    fn symbolize_new_stacks(&mut self) {
        if self.new_stacks.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let mut pending = std::mem::take(&mut self.new_stacks);
        let mut i = 0;
        while i < pending.len() && started.elapsed() < SYMBOLIZE_BUDGET {
            let (pid, id) = pending[i];
            if let Some((_, user)) = self.stack_frames(id).cloned() {
                let text = self.user_symbols.describe(pid, &user);
                self.user_text.insert(id, text);
            }
            i += 1;
        }
        self.new_stacks = pending.split_off(i);
    }

    /// Stack `id` as `function+0xoff` lines: (kernel frames, user frames), innermost first.
    /// User frames are symbolized with the maps of `pid`, a process that allocated there.
    fn stack(
        &mut self,
        id: u64,
        pid: u32,
        call_site: Option<u64>,
    ) -> (Option<Vec<String>>, Option<UserFrames>) {
        let Some((kernel, user)) = self.stack_frames(id).cloned() else {
            return (None, None);
        };
        let ksyms = self.kallsyms.get_or_insert_with(Kallsyms::load);
        let kernel: Vec<String> = allocation_frames(&kernel, call_site, ksyms)
            .iter()
            .map(|&ip| ksyms.describe(ip))
            .collect();
        let user = self
            .opts
            .user_stacks
            .then(|| match self.user_text.get(&id) {
                Some(text) => text.clone(),
                None => self.user_symbols.describe(pid, &user),
            });
        (
            (self.opts.stacks && !kernel.is_empty()).then_some(kernel),
            user,
        )
    }

    /// [`Self::collect_stacks`] between reports, so a run without `-i` does not fill the
    /// stack map: one pass over the table for the stacks its objects use.
    fn gc_stacks(&mut self) {
        let mut in_use: HashMap<u64, u64> = HashMap::new();
        if let Some(maps) = &self.maps {
            let scanned = outstanding::for_each(&maps.keys, &maps.records, |_, a| {
                if a.stack_id != 0 {
                    *in_use.entry(a.stack_id).or_default() += 1;
                }
            });
            if scanned.is_err() {
                return;
            }
        }
        self.collect_stacks(&in_use);
        self.publish_untracked();
    }

    /// Drops kernel stacks no outstanding object has used for a whole report interval, so the
    /// stack map never fills with stacks of objects long freed.
    fn collect_stacks(&mut self, in_use: &HashMap<u64, u64>) {
        let Some(stacks) = self.maps.as_mut().and_then(|m| m.stacks.as_mut()) else {
            return;
        };
        let unused: HashSet<u64> = stacks
            .keys()
            .flatten()
            .filter(|id| !in_use.contains_key(id))
            .collect();
        let mut dropped = false;
        for id in unused.intersection(&self.stacks_unused) {
            dropped |= stacks.remove(id).is_ok();
        }
        // Site slots may still hand out a dropped id: have them walk again.
        self.untracked_changed |= dropped;
        self.stack_frames.retain(|id, _| in_use.contains_key(id));
        self.user_text.retain(|id, _| in_use.contains_key(id));
        self.stacks_unused = unused;
    }

    /// (allocations tracked, tracked objects freed) since the start: every tracked object not
    /// outstanding any more was freed, seen or not (implicit frees).
    fn counters(sites: &HashMap<SlabSiteKey, SlabSiteCounts>, outstanding: u64) -> (u64, u64) {
        let allocs: u64 = sites.values().map(|c| c.allocs).sum();
        (allocs, allocs.saturating_sub(outstanding))
    }

    fn build(&mut self, ctx: &ReportContext<'_>) -> Result<SlabReport, Error> {
        let now_ns = monotonic_ns();
        self.refresh_caches();
        let fold = Fold {
            by: self.opts.by,
            min_age_ns: self.opts.min_age.map_or(0, |d| d.as_nanos() as u64),
            settle_ns: SETTLE.as_nanos() as u64,
            now_ns,
            counted_until: now_ns,
            stacks: self.opts.stacks || self.opts.user_stacks,
        };
        let sizes: HashMap<u64, (u32, u32)> = self
            .caches
            .iter()
            .map(|(&id, m)| (id, (m.object_size, m.size)))
            .collect();
        // Site counts are read first, then the table: an object allocated meanwhile is in the
        // table but not in its site's count, so frees count only objects older than this
        // (the time an allocation carries may lag a tick: a few objects at most).
        let counted_until = monotonic_ns();
        let sites = self.read_sites();
        let per_cache = self.classify_sites(&sites);
        self.publish_untracked();
        let fold = Fold {
            counted_until,
            ..fold
        };
        let mut agg = Aggregate::default();
        let mut untraced: HashMap<u64, CacheAcc> = HashMap::new();
        let mut filter = CacheFilter {
            names: &self.opts.caches,
            aliases: &self.aliases,
            memo: HashMap::new(),
        };
        let mut in_use: HashMap<u64, u64> = HashMap::new();
        if let Some(maps) = &self.maps {
            let caches = &mut self.caches;
            let frees_untraced = &self.frees_untraced;
            let caches_untraced = &self.caches_untraced;
            outstanding::for_each(&maps.keys, &maps.records, |_, a| {
                if a.stack_id != 0 {
                    *in_use.entry(a.stack_id).or_default() += 1;
                }
                if !filter.wants(caches, a.cache) {
                    return;
                }
                let site = SlabSiteKey {
                    call_site: a.call_site,
                    cache: a.cache,
                };
                if frees_untraced.contains(&site) || caches_untraced.contains(&a.cache) {
                    let c = untraced.entry(a.cache).or_default();
                    c.objects += 1;
                    c.bytes += sizes
                        .get(&a.cache)
                        .map_or(a.bytes_alloc as u64, |s| s.1 as u64);
                } else {
                    agg.add(a, &fold, &sizes);
                }
            })?;
        }
        // The sites the rows and totals count: of the caches asked for, freeing in sight.
        let counted_sites: HashMap<SlabSiteKey, SlabSiteCounts> = sites
            .iter()
            .filter(|(k, _)| {
                !self.frees_untraced.contains(k)
                    && !self.caches_untraced.contains(&k.cache)
                    && filter.wants(&mut self.caches, k.cache)
            })
            .map(|(k, c)| (*k, *c))
            .collect();
        drop(filter);
        let interval = ctx.kind == ReportKind::Interval;
        let empty = Previous::default();
        let prev = std::mem::take(&mut self.prev);
        let base = if interval { &prev } else { &empty };
        // Allocations per group in what the report covers (callsite and cache groups only).
        let mut group_allocs: HashMap<GroupKey, u64> = HashMap::new();
        if matches!(self.opts.by, GroupBy::Callsite | GroupBy::Cache) {
            for (k, &n) in &counted_sites {
                let before = base.sites.get(k).map_or(0, |c| c.allocs);
                let since = n.allocs.saturating_sub(before);
                let key = match self.opts.by {
                    GroupBy::Callsite => (k.call_site, k.cache),
                    _ => (k.cache, 0),
                };
                *group_allocs.entry(key).or_default() += since;
            }
        }
        let ksyms_needed = matches!(self.opts.by, GroupBy::Callsite | GroupBy::Stack);
        if ksyms_needed && self.kallsyms.is_none() {
            self.kallsyms = Some(Kallsyms::load());
        }
        let mut order: Vec<(GroupKey, i64, u64)> = agg
            .groups
            .iter()
            .filter(|(_, g)| g.objects > 0)
            .map(|(k, g)| {
                let growth = g.settled as i64 - prev.settled.get(k).copied().unwrap_or(0) as i64;
                (*k, growth, g.bytes)
            })
            .collect();
        // Interval reports lead with what grows; the final one with what holds most.
        if interval {
            order.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        } else {
            order.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(&b.0)));
        }
        let groups_total = order.len();
        let shown = if self.opts.format == Format::Folded {
            groups_total
        } else {
            self.opts.top
        };
        let mut groups = Vec::new();
        for &(key, growth, _) in order.iter().take(shown) {
            let g = &agg.groups[&key];
            // Page and vmalloc events name no call site.
            let call_site = g.call_site.get().filter(|&cs| cs != 0);
            let cache = g.cache.get();
            let pid = g.pid.get();
            let top_stack = g
                .stacks
                .iter()
                .max_by_key(|(id, n)| (n.0, **id))
                .map(|(id, n)| (*id, n.1));
            let allocs = group_allocs.get(&key).copied();
            let all_before = base.all.get(&key).copied().unwrap_or(0);
            let frees = allocs.map(|a| (a + all_before).saturating_sub(g.counted));
            let callsite = call_site.map(|cs| {
                self.kallsyms
                    .get_or_insert_with(Kallsyms::load)
                    .describe(cs)
            });
            let (cache_name, inferred) = match cache {
                Some(id) => {
                    let m = self.cache_meta(id);
                    (Some(m.name.clone()), m.inferred)
                }
                None => (None, false),
            };
            let cache_aliases = cache_name
                .as_deref()
                .map(|n| self.aliases.aliases_of(n))
                .unwrap_or_default();
            let comm = pid.map(|p| self.comm(p));
            let (kernel_stack, user) = match top_stack {
                Some((id, pid)) => self.stack(id, pid, call_site),
                None => (None, None),
            };
            let user_stack_truncated = user.as_ref().is_some_and(|u| u.1);
            let user_stack = user.map(|u| u.0);
            groups.push(GroupReport {
                callsite,
                cache: cache_name,
                cache_aliases,
                cache_inferred: inferred,
                pid,
                comm,
                objects: g.objects,
                bytes: g.bytes,
                requested_bytes: g.requested_bytes,
                max_age_ms: g
                    .oldest_ns
                    .map_or(0, |t| now_ns.saturating_sub(t) / 1_000_000),
                growth_objects: growth,
                allocs,
                frees,
                age_histogram: age_histogram(&g.ages),
                kernel_stack,
                user_stack,
                user_stack_truncated,
            });
        }

        let slabinfo_now = caches::read_slabinfo();
        // One row per cache name (kmalloc-large takes several size ids): the objects of sites
        // that free in sight, and apart those of sites that do not.
        let mut rows: HashMap<String, CacheReport> = HashMap::new();
        let ids: HashSet<u64> = agg.caches.keys().chain(untraced.keys()).copied().collect();
        for id in ids {
            let m = self.cache_meta(id).clone();
            let traced = agg.caches.get(&id).copied().unwrap_or_default();
            let out_of_sight = untraced.get(&id).copied().unwrap_or_default();
            let implicit = per_cache.get(&id).map_or(0, |c| c.implicit_frees);
            let row = rows.entry(m.name.clone()).or_insert_with(|| {
                let start = self
                    .slabinfo_start
                    .as_ref()
                    .ok()
                    .and_then(|s| s.get(&m.name));
                let now = slabinfo_now.as_ref().ok().and_then(|s| s.get(&m.name));
                CacheReport {
                    frees_untraced: false,
                    objects_frees_untraced: 0,
                    implicit_frees: 0,
                    aliases: self.aliases.aliases_of(&m.name),
                    inferred: m.inferred,
                    objects: 0,
                    bytes: 0,
                    slabinfo_delta: match (start, now) {
                        (Some(s), Some(n)) => Some(n.active_objs as i64 - s.active_objs as i64),
                        _ => None,
                    },
                    slabinfo_active: now.map(|n| n.active_objs),
                    name: m.name.clone(),
                }
            });
            row.objects += traced.objects;
            row.bytes += traced.bytes;
            row.objects_frees_untraced += out_of_sight.objects;
            row.frees_untraced |= out_of_sight.objects > 0;
            row.implicit_frees += implicit;
        }
        let mut caches_out: Vec<CacheReport> = rows.into_values().collect();
        caches_out.sort_by(|a, b| {
            (b.bytes, b.objects, b.objects_frees_untraced)
                .cmp(&(a.bytes, a.objects, a.objects_frees_untraced))
                .then_with(|| a.name.cmp(&b.name))
        });

        let tracer = ctx.tracer;
        let (allocs_total, frees_total) = Self::counters(&counted_sites, agg.counted);
        let skipped: u64 = sites.values().map(|c| c.skipped).sum();
        let implicit_total = tracer.counter(counter::SLAB_IMPLICIT_FREES);
        let skipped_before: u64 = base.sites.values().map(|c| c.skipped).sum();
        let (allocs, frees) = (
            allocs_total.saturating_sub(base.allocs),
            frees_total.saturating_sub(base.frees),
        );
        let covers = ctx.covers.as_secs_f64().max(1e-9);
        let c = tracer.counters();
        let loss = Loss::new;
        let misses = |name: &str| tracer.recursion_misses(name).unwrap_or(0);
        // A free is lost when its first program skipped it and the second did not pick it up
        // (nested twice, or no second program).
        let first_free_misses: u64 = [
            "kfree_raw",
            "kmem_cache_free_raw",
            "mm_page_free_raw",
            "mm_page_free_batched_raw",
            "percpu_free_percpu_raw",
            "free_vmap_area_noflush_raw",
        ]
        .iter()
        .map(|p| misses(p))
        .sum();
        let frees_missed = first_free_misses
            .saturating_sub(tracer.counter(counter::SLAB_FREES_NESTED))
            + misses("kfree")
            + misses("kmem_cache_free");
        let allocs_missed: u64 = [
            "kmalloc_raw",
            "kmem_cache_alloc_raw",
            "kmalloc",
            "kmem_cache_alloc",
            "mm_page_alloc_raw",
            "percpu_alloc_percpu_raw",
            "alloc_vmap_area_raw",
        ]
        .iter()
        .map(|p| misses(p))
        .sum();
        let causes = vec![
            loss(
                "frees_missed",
                frees_missed,
                "frees neither free program saw (nested twice in interrupts; estimated): their \
                 objects stay outstanding until their address is allocated again",
            ),
            loss(
                "allocs_missed",
                allocs_missed,
                "allocations the kernel skipped while an allocation program ran on that CPU \
                 (not tracked)",
            ),
            loss(
                "slab_untracked",
                tracer.counter(counter::SLAB_UNTRACKED),
                "outstanding-object map full (--max-tracked): allocations not tracked",
            ),
            loss(
                "slab_sites_full",
                tracer.counter(counter::SLAB_SITES_FULL),
                "callsite counter map full: a site's counts not kept when its slot was handed over",
            ),
            loss(
                "stack_empty",
                tracer.counter(counter::SLAB_STACK_LOST),
                "stack walks found no frame (a kernel thread or an interrupt has no user stack)",
            ),
            loss(
                "stack_table_full",
                tracer.counter(counter::SLAB_STACKS_FULL),
                "stack map full: allocation kept without its stack",
            ),
            loss(
                "cache_unnamed",
                tracer.counter(counter::SLAB_CACHE_UNNAMED),
                "kmem_cache name not read (map full, or kernel memory not readable)",
            ),
            loss(
                "ringbuf_full_other",
                c.ringbuf_full_other,
                "ring buffer full: process records dropped (names, children)",
            ),
            loss(
                "target_map_full",
                c.targets_full,
                "target map full: children not followed",
            ),
        ];
        let lost = LostReport {
            events: tracer.counter(counter::SLAB_UNTRACKED) + frees_missed + allocs_missed,
            causes,
        };
        let report = SlabReport {
            scope: if interval {
                Scope::Interval
            } else {
                Scope::Total
            },
            duration_s: ctx.elapsed.as_secs_f64(),
            covers_s: ctx.covers.as_secs_f64(),
            by: self.opts.by,
            other_memory: self.opts.pages || self.opts.percpu || self.opts.vmalloc,
            min_age_ms: self.opts.min_age.map(|d| d.as_millis() as u64),
            groups_total,
            groups,
            caches: caches_out,
            totals: Totals {
                objects: agg.objects,
                bytes: agg.bytes,
                objects_frees_untraced: untraced.values().map(|c| c.objects).sum(),
                allocs_not_tracked: skipped.saturating_sub(skipped_before),
                allocs,
                frees,
                allocs_per_s: allocs as f64 / covers,
                frees_per_s: frees as f64 / covers,
                implicit_frees: implicit_total.saturating_sub(base.implicit_frees),
                max_tracked: self.opts.max_tracked,
                table_bytes: table_bytes(self.opts.max_tracked),
            },
            lost,
            slabinfo_unavailable: slabinfo_now
                .err()
                .or_else(|| self.slabinfo_start.clone().err()),
            // Per slab event traced (allocations and frees since the start), not per ring
            // record: the kernel sends the agent almost none.
            agent: AgentStats::current(allocs_total + frees_total + skipped),
        };
        self.collect_stacks(&in_use);
        self.publish_untracked();
        // Growth is always since the previous report; interval counts since the previous
        // interval report.
        self.prev = prev;
        self.prev.settled = agg.groups.iter().map(|(k, g)| (*k, g.settled)).collect();
        if interval {
            self.prev.all = agg
                .groups
                .iter()
                .map(|(k, g)| (*k, g.all_objects))
                .collect();
            self.prev.sites = sites;
            self.prev.allocs = allocs_total;
            self.prev.frees = frees_total;
            self.prev.implicit_frees = implicit_total;
        }
        Ok(report)
    }
}

impl Analysis for SlabAnalysis {
    type Report = SlabReport;

    fn what(&self) -> &'static str {
        "slab allocations"
    }

    fn hook_groups(&self) -> &'static [&'static HookGroup] {
        self.hook_groups
    }

    fn traces_kernel_threads(&self) -> bool {
        true
    }

    fn start(&mut self, tracer: &mut Tracer, _system_wide: bool) -> Result<(), Error> {
        let map_err = |e: aya::maps::MapError| Error::Map(e.to_string());
        let array = |m: Map, name: &str| match m {
            Map::Array(d) => Ok(d),
            _ => Err(Error::Map(format!("map {name} is not an array"))),
        };
        let keys = array(tracer.take_map("SLAB_KEYS")?, "SLAB_KEYS")?;
        let records = array(tracer.take_map("SLAB_RECORDS")?, "SLAB_RECORDS")?;
        let sites = PerCpuHashMap::try_from(tracer.take_map("SLAB_SITES")?).map_err(map_err)?;
        let site_slots =
            PerCpuArray::try_from(tracer.take_map("SLAB_SITE_SLOTS")?).map_err(map_err)?;
        let caches = BpfHashMap::try_from(tracer.take_map("SLAB_CACHES")?).map_err(map_err)?;
        let stacks = if self.opts.stacks || self.opts.user_stacks {
            Some(BpfHashMap::try_from(tracer.take_map("SLAB_STACKS")?).map_err(map_err)?)
        } else {
            None
        };
        let untracked_sites =
            BpfHashMap::try_from(tracer.take_map("SLAB_UNTRACKED_SITES")?).map_err(map_err)?;
        let untracked_caches =
            BpfHashMap::try_from(tracer.take_map("SLAB_UNTRACKED_CACHES")?).map_err(map_err)?;
        let untracked_generation =
            aya::maps::Array::try_from(tracer.take_map("SLAB_UNTRACKED_GENERATION")?)
                .map_err(map_err)?;
        self.maps = Some(SlabMaps {
            untracked_sites,
            untracked_caches,
            untracked_generation,
            keys,
            records,
            sites,
            site_slots,
            caches,
            stacks,
        });
        self.aliases = AliasGroups::read();
        self.slabinfo_start = caches::read_slabinfo();
        Ok(())
    }

    fn target_added(&mut self, pid: u32) {
        let _ = self.comm(pid);
    }

    fn drain(&mut self, ring: &mut Ring) -> bool {
        let more = self.drain_ring(ring);
        self.symbolize_new_stacks();
        if self.last_classified.elapsed() >= CLASSIFY_EVERY {
            self.last_classified = std::time::Instant::now();
            self.stop_tracking_untraced();
        }
        if (self.opts.stacks || self.opts.user_stacks)
            && self.last_stack_gc.elapsed() >= STACK_GC_EVERY
        {
            self.last_stack_gc = std::time::Instant::now();
            self.gc_stacks();
        }
        more
    }

    fn descendants_alive(&self, command: u32) -> bool {
        self.children
            .iter()
            .any(|&pid| pid != command && process_alive(pid))
    }

    fn report(&mut self, ctx: &ReportContext<'_>) -> SlabReport {
        self.report_or_error(ctx)
    }
}

impl SlabAnalysis {
    fn drain_ring(&mut self, ring: &mut Ring) -> bool {
        for _ in 0..DRAIN_BATCH {
            let Some(item) = ring.next() else {
                return false;
            };
            match record::decode(&item) {
                Some(Record::Proc(p)) => self.on_proc(&p),
                Some(Record::SlabStack(s)) if self.new_stacks.len() < MAX_NEW_STACKS => {
                    self.new_stacks.push((s.pid, s.id))
                }
                _ => {}
            }
        }
        true
    }

    fn report_or_error(&mut self, ctx: &ReportContext<'_>) -> SlabReport {
        let started = std::time::Instant::now();
        match self.build(ctx) {
            Ok(r) => {
                // A diagnostic for developers, as for `faults`.
                if std::env::var_os("MEMTRACE_FOOTPRINT").is_some() {
                    eprintln!(
                        "footprint: slab report of {} objects ({} groups) built in {} ms; \
                         rss {} MiB, peak {} MiB",
                        r.totals.objects + r.totals.objects_frees_untraced,
                        r.groups_total,
                        started.elapsed().as_millis(),
                        r.agent.rss_bytes >> 20,
                        r.agent.peak_rss_bytes >> 20
                    );
                }
                r
            }
            Err(e) => {
                crate::engine::say(format_args!("memtrace: slab report incomplete: {e}"));
                SlabReport {
                    scope: Scope::Total,
                    duration_s: ctx.elapsed.as_secs_f64(),
                    covers_s: ctx.covers.as_secs_f64(),
                    by: self.opts.by,
                    other_memory: false,
                    min_age_ms: None,
                    groups_total: 0,
                    groups: Vec::new(),
                    caches: Vec::new(),
                    totals: Totals::default(),
                    lost: LostReport {
                        events: 0,
                        causes: Vec::new(),
                    },
                    slabinfo_unavailable: Some(e.to_string()),
                    agent: AgentStats::current(0),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(allocs: u64, implicit_frees: u64) -> SlabSiteCounts {
        SlabSiteCounts {
            allocs,
            implicit_frees,
            skipped: 0,
        }
    }

    #[test]
    fn a_site_frees_out_of_sight_when_its_addresses_come_back_tracked() {
        assert!(frees_untraced(&counts(1000, 50)));
        assert!(!frees_untraced(&counts(1000, 49)), "under one in twenty");
        assert!(!frees_untraced(&counts(20, 15)), "too few to tell");
        assert!(!frees_untraced(&counts(1_000_000, 0)));
    }

    #[test]
    fn a_user_stack_is_whole_when_it_ends_where_the_thread_began() {
        assert!(is_thread_entry("__libc_start_call_main+0x7a (libc.so.6)"));
        assert!(is_thread_entry("start_thread+0xf2 (libc.so.6)"));
        assert!(!is_thread_entry("__GI_socketpair+0xa (libc.so.6)"));
        assert!(!is_thread_entry("main+0x2d (app)"));
    }

    #[test]
    fn allocation_stacks_start_at_the_call_site() {
        let ksyms = Kallsyms::parse(
            "ffffffff81000000 T bpf_trace_run6\n\
             ffffffff81001000 T __kmalloc_node_noprof\n\
             ffffffff81002000 T alloc_pipe_info\n\
             ffffffff81003000 T do_pipe2\n\
             ffffffffc0000000 t bpf_prog_1_kmalloc_raw [bpf]\n",
        );
        let stack = [
            0xffffffffc0000010,
            0xffffffff81000010,
            0xffffffff81001010,
            0xffffffff81002010,
            0xffffffff81003010,
        ];
        assert_eq!(
            allocation_frames(&stack, Some(0xffffffff81002010), &ksyms),
            &stack[3..]
        );
        // Without the call site in the stack: past the dispatch and the allocator.
        assert_eq!(allocation_frames(&stack, None, &ksyms), &stack[3..]);
        assert_eq!(allocation_frames(&stack[3..], None, &ksyms), &stack[3..]);
    }
}
