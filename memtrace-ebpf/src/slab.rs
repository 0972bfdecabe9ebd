//! Slab allocations: kmalloc and kmem_cache_alloc add an object to the outstanding map under its
//! address, kfree and kmem_cache_free take it out. Nothing goes through the ring buffer: at two
//! million events a second the agent reads the maps at report time instead.
//!
//! Raw tracepoints first (their argument lists are checked against the kernel's BTF by the
//! agent): a classic tracepoint program is skipped while another BPF program runs on the CPU,
//! and a free taken in an interrupt over a traced program would then leave a phantom leak.
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_get_stack, bpf_jiffies64},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext as _,
};
use memtrace_common::{
    counter, is_kmalloc_cache_id, is_other_memory_id, kmalloc_cache_id, layout, slab_bucket,
    slab_site_slot, stack_hash, RecordKind, SlabAlloc, SlabBucket, SlabCacheInfo, SlabRecords,
    SlabSiteCounts, SlabSiteKey, SlabSiteSlot, SlabStack, SlabStackRecord, GFP_ACCOUNT,
    OFFSET_UNKNOWN, PAGES_CACHE_ID, PERCPU_CACHE_ID, SLAB_ACCOUNTED, SLAB_BUCKET_WAYS,
    SLAB_CACHE_NAME_LEN, SLAB_KMALLOC, SLAB_SITE_SLOT_COUNT, SLAB_STACK_DEPTH,
    SLAB_STACK_REWALK_MEAN, SLAB_USER_STACK_DEPTH, VMALLOC_CACHE_ID,
};

use crate::config;
use crate::maps::{bump, current_ids, is_target, tp_field, EVENTS};

/// Outstanding objects: their addresses by bucket (see `SlabBucket`), and their records at the
/// same bucket and way. Sized by the agent (`memtrace slab --max-tracked`).
#[map]
pub static SLAB_KEYS: Array<SlabBucket> = Array::with_max_entries(2, 0);
#[map]
pub static SLAB_RECORDS: Array<SlabRecords> = Array::with_max_entries(2, 0);

/// Allocations per (call site, cache), per CPU: rates per callsite without a shared counter.
#[map]
pub static SLAB_SITES: PerCpuHashMap<SlabSiteKey, SlabSiteCounts> =
    PerCpuHashMap::with_max_entries(1024, 0);

/// kmem_caches seen, by `struct kmem_cache` pointer (or the name's hash on classic tracepoints).
#[map]
pub static SLAB_CACHES: HashMap<u64, SlabCacheInfo> = HashMap::with_max_entries(4096, 0);

/// Kernel stacks of allocations (with `--stacks`), by content hash.
#[map]
pub static SLAB_STACKS: HashMap<u64, SlabStack> = HashMap::with_max_entries(1, 0);

/// Sites and caches whose objects are counted but not tracked: the agent found them freeing
/// with no event (kfree_rcu, bulk frees). Changes bump the generation, which every CPU's site
/// slots compare against.
#[map]
pub static SLAB_UNTRACKED_SITES: HashMap<SlabSiteKey, u8> = HashMap::with_max_entries(4096, 0);
#[map]
pub static SLAB_UNTRACKED_CACHES: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);
#[map]
pub static SLAB_UNTRACKED_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU, running counts of the sites allocating now (see `SlabSiteSlot`).
#[map]
pub static SLAB_SITE_SLOTS: PerCpuArray<SlabSiteSlot> =
    PerCpuArray::with_max_entries(SLAB_SITE_SLOT_COUNT, 0);

/// Per-CPU room for a stack while it is hashed, one per nesting level (task, softirq,
/// hardirq, NMI).
#[map]
static SLAB_STACK_SCRATCH: PerCpuArray<SlabStack> =
    PerCpuArray::with_max_entries(STACK_SCRATCH_LEVELS, 0);
const STACK_SCRATCH_LEVELS: u32 = 4;

/// `ZERO_SIZE_PTR`: what kmalloc(0) returns; never a real object.
const ZERO_SIZE_PTR: u64 = 16;

// Raw tracepoints: the arguments of the kernel's trace_*() calls (include/trace/events/kmem.h).

/// `kmalloc(call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node)`
#[raw_tracepoint(tracepoint = "kmalloc")]
pub fn kmalloc_raw(ctx: RawTracePointContext) -> u32 {
    let gfp = ctx.arg::<u64>(4);
    let bytes_alloc = ctx.arg::<u64>(3);
    on_alloc(
        ctx.as_ptr(),
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        kmalloc_cache_id(bytes_alloc, gfp),
        ctx.arg::<u64>(2),
        bytes_alloc,
        gfp,
    );
    0
}

/// `kmem_cache_alloc(call_site, ptr, struct kmem_cache *s, gfp_flags, node)`
#[raw_tracepoint(tracepoint = "kmem_cache_alloc")]
pub fn kmem_cache_alloc_raw(ctx: RawTracePointContext) -> u32 {
    let cache = ctx.arg::<u64>(2);
    let ptr = ctx.arg::<u64>(1);
    if cache != 0 {
        on_alloc(
            ctx.as_ptr(),
            ctx.arg::<u64>(0),
            ptr,
            cache,
            0,
            0,
            ctx.arg::<u64>(3),
        );
    }
    0
}

/// `kfree(call_site, ptr)`
#[raw_tracepoint(tracepoint = "kfree")]
pub fn kfree_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(1));
    0
}

/// `kmem_cache_free(call_site, ptr, struct kmem_cache *s)`
#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn kmem_cache_free_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(1));
    0
}

// Memory from outside the slab caches (`--pages`, `--percpu`, `--vmalloc`): raw tracepoints
// only, their arguments checked against BTF like the rest.

/// `mm_page_alloc(struct page *page, unsigned int order, gfp_t gfp_flags, int migratetype)`:
/// no call site; pages are keyed by their `struct page`.
#[raw_tracepoint(tracepoint = "mm_page_alloc")]
pub fn mm_page_alloc_raw(ctx: RawTracePointContext) -> u32 {
    let order = ctx.arg::<u64>(1) & 0x1f;
    let gfp = ctx.arg::<u64>(2);
    on_alloc(
        ctx.as_ptr(),
        0,
        ctx.arg::<u64>(0),
        PAGES_CACHE_ID | order,
        4096 << order,
        4096 << order,
        gfp,
    );
    0
}

/// `mm_page_free(struct page *page, unsigned int order)`
#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn mm_page_free_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn mm_page_free_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(0));
    0
}

/// `mm_page_free_batched(struct page *page)`
#[raw_tracepoint(tracepoint = "mm_page_free_batched")]
pub fn mm_page_free_batched_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "mm_page_free_batched")]
pub fn mm_page_free_batched_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(0));
    0
}

/// `percpu_alloc_percpu(call_site, reserved, is_atomic, size, align, base_addr, off, ptr,
/// bytes_alloc, gfp_flags)`: bytes are per CPU.
#[raw_tracepoint(tracepoint = "percpu_alloc_percpu")]
pub fn percpu_alloc_percpu_raw(ctx: RawTracePointContext) -> u32 {
    on_alloc(
        ctx.as_ptr(),
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(7),
        PERCPU_CACHE_ID,
        ctx.arg::<u64>(3),
        ctx.arg::<u64>(8),
        ctx.arg::<u64>(9),
    );
    0
}

/// `percpu_free_percpu(base_addr, off, ptr)`
#[raw_tracepoint(tracepoint = "percpu_free_percpu")]
pub fn percpu_free_percpu_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(2));
    0
}

#[raw_tracepoint(tracepoint = "percpu_free_percpu")]
pub fn percpu_free_percpu_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(2));
    0
}

/// `alloc_vmap_area(addr, size, align, vstart, vend, failed)`: no call site.
#[raw_tracepoint(tracepoint = "alloc_vmap_area")]
pub fn alloc_vmap_area_raw(ctx: RawTracePointContext) -> u32 {
    if ctx.arg::<u64>(5) as i32 == 0 {
        let size = ctx.arg::<u64>(1);
        on_alloc(
            ctx.as_ptr(),
            0,
            ctx.arg::<u64>(0),
            VMALLOC_CACHE_ID,
            size,
            size,
            0,
        );
    }
    0
}

/// `free_vmap_area_noflush(va_start, nr_lazy, nr_lazy_max)`
#[raw_tracepoint(tracepoint = "free_vmap_area_noflush")]
pub fn free_vmap_area_noflush_raw(ctx: RawTracePointContext) -> u32 {
    free_and_mark(ctx.arg::<u64>(0));
    0
}

#[raw_tracepoint(tracepoint = "free_vmap_area_noflush")]
pub fn free_vmap_area_noflush_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(0));
    0
}

// A raw tracepoint skips a program while that program runs on the same CPU: a free in an
// interrupt (RCU callbacks run thousands of them in a softirq) that lands while the free
// program runs is never seen, and its object would stay "outstanding" for good. A second
// program on each free tracepoint, run after the first, handles the frees the first did not
// (it is free to run when the first is the one interrupted, and the other way round).

/// The first program's free: untracks the object and marks it handled for the second.
#[inline(always)]
fn free_and_mark(ptr: u64) {
    on_free(ptr);
    if let Some(cpu) = SLAB_CPU.get_ptr_mut(0) {
        // SAFETY: this CPU's value from a successful lookup.
        unsafe { (*cpu).free_mark = ptr };
    }
}

/// Handles a free the first program skipped (it was running, interrupted, on this CPU).
#[inline(always)]
fn on_free_backup(ptr: u64) {
    if let Some(cpu) = SLAB_CPU.get_ptr_mut(0) {
        // SAFETY: this CPU's value from a successful lookup.
        unsafe {
            let mark = &mut (*cpu).free_mark;
            if *mark == ptr {
                // Handled. Cleared, so a later free of the same address (slab freelists hand
                // the last freed address out first) that the first program misses is taken.
                *mark = 0;
                return;
            }
        }
    }
    // The first program did not handle this free: it was skipped (or, rarely, interrupted
    // between its end and this program's start, and already did).
    bump(counter::SLAB_FREES_NESTED);
    if ptr > ZERO_SIZE_PTR {
        untrack(ptr);
    }
}

#[raw_tracepoint(tracepoint = "kfree")]
pub fn kfree_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(1));
    0
}

#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn kmem_cache_free_backup_raw(ctx: RawTracePointContext) -> u32 {
    on_free_backup(ctx.arg::<u64>(1));
    0
}

// Classic tracepoints: fields at the offsets `memtrace_common::layout` names, checked against
// the format files before loading.

#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets checked against this kernel's kmem:kmalloc format by the agent.
    let (call_site, ptr, bytes_req, bytes_alloc, gfp) = unsafe {
        (
            tp_field::<u64, { layout::KMEM_CALL_SITE.1 }>(&ctx),
            tp_field::<u64, { layout::KMEM_PTR.1 }>(&ctx),
            tp_field::<u64, { layout::KMALLOC_BYTES_REQ.1 }>(&ctx),
            tp_field::<u64, { layout::KMALLOC_BYTES_ALLOC.1 }>(&ctx),
            tp_field::<u64, { layout::KMALLOC_GFP.1 }>(&ctx),
        )
    };
    let cache = kmalloc_cache_id(bytes_alloc, gfp);
    on_alloc(
        ctx.as_ptr(),
        call_site,
        ptr,
        cache,
        bytes_req,
        bytes_alloc,
        gfp,
    );
    0
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets checked against this kernel's kmem:kmem_cache_alloc format by the agent.
    let (call_site, ptr, name_loc, bytes_req, bytes_alloc, gfp) = unsafe {
        (
            tp_field::<u64, { layout::KMEM_CALL_SITE.1 }>(&ctx),
            tp_field::<u64, { layout::KMEM_PTR.1 }>(&ctx),
            tp_field::<u32, { layout::CACHE_ALLOC_NAME.1 }>(&ctx),
            tp_field::<u64, { layout::CACHE_ALLOC_BYTES_REQ.1 }>(&ctx),
            tp_field::<u64, { layout::CACHE_ALLOC_BYTES_ALLOC.1 }>(&ctx),
            tp_field::<u64, { layout::CACHE_ALLOC_GFP.1 }>(&ctx),
        )
    };
    if ptr <= ZERO_SIZE_PTR {
        return 0;
    }
    // The record names the cache but holds no pointer to it: the name's hash stands for it.
    let mut info = SlabCacheInfo {
        name: [0; SLAB_CACHE_NAME_LEN],
        object_size: bytes_req as u32,
        size: bytes_alloc as u32,
    };
    // A __data_loc field: the string's offset in the record in the low 16 bits.
    let name = (ctx.as_ptr() as u64).wrapping_add((name_loc & 0xffff) as u64);
    // SAFETY: a read of the trace record the kernel handed this program; the helper checks
    // the address and stops at the buffer's end.
    let len = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut info.name) }
        .map(|s| s.len())
        .unwrap_or(0);
    let cache = name_hash(&info.name, len);
    note_cache_info(cache, &info);
    on_alloc(ctx.as_ptr(), call_site, ptr, cache, 0, 0, gfp);
    0
}

#[tracepoint]
pub fn kfree(ctx: TracePointContext) -> u32 {
    // SAFETY: offset checked against this kernel's kmem:kfree format by the agent.
    on_free(unsafe { tp_field::<u64, { layout::KMEM_PTR.1 }>(&ctx) });
    0
}

#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    // SAFETY: offset checked against this kernel's kmem:kmem_cache_free format by the agent.
    on_free(unsafe { tp_field::<u64, { layout::KMEM_PTR.1 }>(&ctx) });
    0
}

/// A cache id for a name, with the top bit set like a kernel pointer's.
#[inline(always)]
fn name_hash(name: &[u8; SLAB_CACHE_NAME_LEN], len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < SLAB_CACHE_NAME_LEN {
        if i >= len || name[i] == 0 {
            break;
        }
        h = (h ^ name[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h | 1 << 63
}

/// Makes sure `cache` (a `struct kmem_cache *`) is in `SLAB_CACHES`, reading its name and sizes
/// the first time. Called when a site is first counted, not on every allocation.
#[inline(always)]
fn note_cache(cache: u64) {
    // SAFETY: the value is plain data and only its presence is used.
    if unsafe { SLAB_CACHES.get(cache) }.is_none() {
        record_cache(cache);
    }
}

/// Reads a kmem_cache's name and sizes at the offsets the agent found in the kernel's BTF.
#[inline(never)]
fn record_cache(cache: u64) {
    let mut info = SlabCacheInfo {
        name: [0; SLAB_CACHE_NAME_LEN],
        object_size: 0,
        size: 0,
    };
    let mut named = false;
    if config!(kmem_cache_name_off) != OFFSET_UNKNOWN {
        let field = cache.wrapping_add(config!(kmem_cache_name_off) as u64) as *const u64;
        // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
        if let Ok(name) = unsafe { bpf_probe_read_kernel(field) } {
            // SAFETY: as above; the helper stops at the buffer's end.
            named = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut info.name) }
                .is_ok_and(|s| !s.is_empty());
        }
    }
    if config!(kmem_cache_object_size_off) != OFFSET_UNKNOWN {
        let field = cache.wrapping_add(config!(kmem_cache_object_size_off) as u64) as *const u32;
        // SAFETY: as above.
        info.object_size = unsafe { bpf_probe_read_kernel(field) }.unwrap_or(0);
    }
    if config!(kmem_cache_size_off) != OFFSET_UNKNOWN {
        let field = cache.wrapping_add(config!(kmem_cache_size_off) as u64) as *const u32;
        // SAFETY: as above.
        info.size = unsafe { bpf_probe_read_kernel(field) }.unwrap_or(0);
    }
    if !named {
        bump(counter::SLAB_CACHE_UNNAMED);
    }
    if SLAB_CACHES.insert(cache, info, BPF_NOEXIST as u64).is_err() {
        // Present already (another CPU got there first) or full; only full matters.
        // SAFETY: presence only.
        if unsafe { SLAB_CACHES.get(cache) }.is_none() {
            bump(counter::SLAB_CACHE_UNNAMED);
        }
    }
}

/// [`note_cache`] for the classic tracepoint, which has the name and sizes in its record.
#[inline(always)]
fn note_cache_info(cache: u64, info: &SlabCacheInfo) {
    // SAFETY: presence only.
    if unsafe { SLAB_CACHES.get(cache) }.is_none()
        && SLAB_CACHES.insert(cache, info, BPF_NOEXIST as u64).is_err()
        // SAFETY: presence only.
        && unsafe { SLAB_CACHES.get(cache) }.is_none()
    {
        bump(counter::SLAB_CACHE_UNNAMED);
    }
}

#[inline(always)]
fn on_alloc(
    ctx: *mut core::ffi::c_void,
    call_site: u64,
    ptr: u64,
    cache: u64,
    bytes_req: u64,
    bytes_alloc: u64,
    gfp: u64,
) {
    if ptr <= ZERO_SIZE_PTR {
        return;
    }
    let (pid, tid) = current_ids();
    if !is_target(pid) {
        return;
    }
    let site = SlabSiteKey { call_site, cache };
    let Some(slot) = site_slot(&site) else {
        return;
    };
    if slot.untracked != 0 {
        slot.counts.skipped += 1;
        return;
    }
    let stack_id = if config!(slab_kernel_stacks) != 0 || config!(slab_user_stacks) != 0 {
        sampled_stack(ctx, slot)
    } else {
        0
    };
    let mut flags = 0;
    if gfp & GFP_ACCOUNT != 0 {
        flags |= SLAB_ACCOUNTED;
    }
    if bytes_alloc != 0 {
        flags |= SLAB_KMALLOC;
    }
    let (time_ns, cgroup) = clock_and_cgroup(pid);
    let alloc = SlabAlloc {
        time_ns,
        call_site,
        cache,
        cgroup,
        stack_id,
        pid,
        tid,
        bytes_req: bytes_req as u32,
        bytes_alloc: bytes_alloc as u32,
        flags,
        _pad: 0,
    };
    match track(ptr, &alloc) {
        Tracked::New => {}
        Tracked::Replaced(old) => {
            // The object at this address was freed with no event: it counts as freed, against
            // the site that allocated it (which frees out of sight: kfree_rcu, bulk frees).
            bump(counter::SLAB_IMPLICIT_FREES);
            let old_site = SlabSiteKey {
                call_site: old.call_site,
                cache: old.cache,
            };
            add_site_counts(
                &old_site,
                &SlabSiteCounts {
                    implicit_frees: 1,
                    ..SlabSiteCounts::default()
                },
            );
        }
        Tracked::Full => {
            bump(counter::SLAB_UNTRACKED);
            return;
        }
    }
    if slot.key == site {
        slot.counts.allocs += 1;
    } else {
        // An allocation in an interrupt took the slot over meanwhile.
        add_site_counts(
            &site,
            &SlabSiteCounts {
                allocs: 1,
                ..SlabSiteCounts::default()
            },
        );
    }
}

/// A CPU's small state in one cache line: its last clock reading and cgroup answer (see
/// [`clock_and_cgroup`]), the free mark, the stack-capture depth.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlabCpu {
    jiffies: u64,
    time_ns: u64,
    tgid: u32,
    /// Stack captures in progress on this CPU (nested by interrupts).
    stack_depth: u32,
    cgroup: u64,
    /// The last address the first free program handled (see `on_free_backup`).
    free_mark: u64,
}

#[map]
static SLAB_CPU: PerCpuArray<SlabCpu> = PerCpuArray::with_max_entries(1, 0);

/// The allocation time and the allocating process's cgroup. Reading the clock and walking to
/// the task's cgroup cost about 30 ns each here, twice what the rest of an allocation costs:
/// the clock is read again only when a tick has passed on this CPU (ages are kept to a tick,
/// 1-10 ms, where reports count in tens of ms and up), and the cgroup again only for another
/// process (a process moved between cgroups keeps its old id until another process allocates
/// on that CPU).
#[inline(always)]
fn clock_and_cgroup(tgid: u32) -> (u64, u64) {
    // SAFETY: reads the jiffies counter; no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cpu) = SLAB_CPU.get_ptr_mut(0) else {
        // SAFETY: no preconditions.
        return unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
    };
    // SAFETY: a per-CPU value from a successful lookup, used by this CPU alone meanwhile.
    let cpu = unsafe { &mut *cpu };
    if cpu.jiffies != jiffies || cpu.time_ns == 0 {
        cpu.jiffies = jiffies;
        // SAFETY: no preconditions.
        cpu.time_ns = unsafe { bpf_ktime_get_ns() };
    }
    if cpu.tgid != tgid || cpu.cgroup == 0 {
        cpu.tgid = tgid;
        // SAFETY: no preconditions.
        cpu.cgroup = unsafe { bpf_get_current_cgroup_id() };
    }
    (cpu.time_ns, cpu.cgroup)
}

/// What [`track`] did.
enum Tracked {
    New,
    /// The address was tracked already: this record replaced the one it had.
    Replaced(SlabAlloc),
    /// Both of its buckets are full.
    Full,
}

/// Records an outstanding object: in a free way of one of its two buckets, or in place of the
/// record its address still had. The record is written before the key, so the agent never
/// reads a key with another object's record (x86 keeps stores in order, and volatile writes
/// keep theirs through the compiler).
#[inline(always)]
fn track(ptr: u64, alloc: &SlabAlloc) -> Tracked {
    let (found, free) = find(ptr);
    if let Some((b, way)) = found {
        let Some(records) = SLAB_RECORDS.get_ptr_mut(b) else {
            return Tracked::Full;
        };
        // SAFETY: a way (below SLAB_BUCKET_WAYS, `find` says) of an array value from a
        // successful lookup, valid while the program runs.
        unsafe {
            let old = core::ptr::read_volatile(&(*records).allocs[way]);
            core::ptr::write_volatile(&mut (*records).allocs[way], *alloc);
            return Tracked::Replaced(old);
        }
    }
    let Some((b, way)) = free else {
        return Tracked::Full;
    };
    let first = slab_bucket(ptr, config!(slab_bucket_mask));
    if b != first {
        // The first bucket is full: from now on its lookups read the next one too.
        if let Some(home) = SLAB_KEYS.get_ptr_mut(first) {
            // SAFETY: an array value from a successful lookup; one aligned 8-byte store.
            unsafe { core::ptr::write_volatile(&mut (*home).overflowed, 1) };
        }
    }
    let (Some(keys), Some(records)) = (SLAB_KEYS.get_ptr_mut(b), SLAB_RECORDS.get_ptr_mut(b))
    else {
        return Tracked::Full;
    };
    // SAFETY: as above. Other CPUs write other ways of the bucket; a racing insert into the
    // very same way at the same moment can lose one of the two objects (it frees untracked).
    unsafe {
        core::ptr::write_volatile(&mut (*records).allocs[way], *alloc);
        core::ptr::write_volatile(&mut (*keys).keys[way], ptr);
    }
    Tracked::New
}

/// Forgets an outstanding object; false if it was not tracked.
#[inline(always)]
fn untrack(ptr: u64) -> bool {
    let Some((b, way)) = find(ptr).0 else {
        return false;
    };
    let Some(keys) = SLAB_KEYS.get_ptr_mut(b) else {
        return false;
    };
    // SAFETY: a way of an array value from a successful lookup; one aligned 8-byte store.
    unsafe { core::ptr::write_volatile(&mut (*keys).keys[way], 0) };
    true
}

/// A bucket and one of its ways (always below `SLAB_BUCKET_WAYS`).
type Way = (u32, usize);

/// Where `ptr` is tracked, and the first free way of its two buckets. The second bucket is
/// read only if the first has overflowed into it, or is full.
#[inline(always)]
fn find(ptr: u64) -> (Option<Way>, Option<Way>) {
    let mask = config!(slab_bucket_mask);
    let first = slab_bucket(ptr, mask);
    let mut free = None;
    let mut probe = 0;
    while probe < 2 {
        let b = (first + probe) & mask;
        probe += 1;
        let Some(bucket) = SLAB_KEYS.get_ptr(b) else {
            continue;
        };
        let mut way = 0;
        while way < SLAB_BUCKET_WAYS {
            // SAFETY: an array value from a successful lookup, valid while the program runs;
            // the way is below SLAB_BUCKET_WAYS.
            let key = unsafe { core::ptr::read_volatile(&(*bucket).keys[way]) };
            if key == ptr {
                return (Some((b, way)), free);
            }
            if key == 0 && free.is_none() {
                free = Some((b, way));
            }
            way += 1;
        }
        // SAFETY: as above.
        let overflowed = unsafe { core::ptr::read_volatile(&(*bucket).overflowed) } != 0;
        if probe == 1 && !overflowed && free.is_some() {
            break;
        }
    }
    (None, free)
}

/// This CPU's slot for `site`, taken over from the site that held it if need be: that site's
/// counts are added into `SLAB_SITES` first, and a site new to `SLAB_SITES` gets its entry
/// (and its cache's name) now, so the agent knows every site and cache without scanning slots
/// that churn.
#[inline(always)]
fn site_slot(site: &SlabSiteKey) -> Option<&'static mut SlabSiteSlot> {
    let slot = SLAB_SITE_SLOTS.get_ptr_mut(slab_site_slot(site.call_site, site.cache))?;
    // SAFETY: a per-CPU value from a successful lookup: valid for the program's run and used by
    // this CPU alone meanwhile (BPF programs are not preempted).
    let slot = unsafe { &mut *slot };
    if slot.key != *site {
        take_slot(slot, site);
    } else if (slot.counts.allocs + slot.counts.skipped) % GENERATION_CHECK_EVERY == 0 {
        check_generation(slot);
    }
    Some(slot)
}

/// Allocations of a site slot between looks at the generation: a change takes effect within
/// this many allocations of a site on a CPU, and each allocation reads one line less.
const GENERATION_CHECK_EVERY: u64 = 64;

#[inline(always)]
fn check_generation(slot: &mut SlabSiteSlot) {
    if let Some(generation) = SLAB_UNTRACKED_GENERATION.get_ptr(0) {
        // SAFETY: an array value from a successful lookup; a torn read only re-checks.
        if slot.generation != unsafe { core::ptr::read_volatile(generation) } {
            check_untracked(slot);
        }
    }
}

/// Looks up whether the agent asked for the slot's site not to be tracked.
#[inline(never)]
fn check_untracked(slot: &mut SlabSiteSlot) {
    if let Some(generation) = SLAB_UNTRACKED_GENERATION.get_ptr(0) {
        // SAFETY: as above. Read before the maps, so a change racing with this check bumps
        // the generation after and is seen at the next allocation.
        slot.generation = unsafe { core::ptr::read_volatile(generation) };
    }
    // SAFETY: presence only.
    let untracked = unsafe {
        SLAB_UNTRACKED_SITES.get(slot.key).is_some()
            || SLAB_UNTRACKED_CACHES.get(slot.key.cache).is_some()
    };
    slot.untracked = untracked as u32;
    // The agent also bumps the generation after dropping stacks no object uses: walk again
    // rather than hand out an id it may have dropped.
    slot.stack_hits_left = 0;
}

#[inline(never)]
fn take_slot(slot: &mut SlabSiteSlot, site: &SlabSiteKey) {
    if slot.counts != SlabSiteCounts::default() {
        add_site_counts(&slot.key, &slot.counts);
    }
    // SAFETY: presence only.
    if unsafe { SLAB_SITES.get(site) }.is_none() {
        add_site_counts(site, &SlabSiteCounts::default());
        if !is_kmalloc_cache_id(site.cache) && !is_other_memory_id(site.cache) {
            note_cache(site.cache);
        }
    }
    *slot = SlabSiteSlot {
        key: *site,
        ..SlabSiteSlot::default()
    };
    check_untracked(slot);
}

#[inline(always)]
fn add_site_counts(site: &SlabSiteKey, counts: &SlabSiteCounts) {
    match SLAB_SITES.get_ptr_mut(site) {
        Some(total) => {
            // SAFETY: this CPU's value from a successful lookup; no other CPU writes it.
            unsafe { *total += counts };
        }
        None => {
            if SLAB_SITES.insert(site, counts, BPF_NOEXIST as u64).is_err() {
                bump(counter::SLAB_SITES_FULL);
            }
        }
    }
}

/// The stack of this allocation: the site's last walk on this CPU while it has hits left, else
/// a fresh walk serving a random number of the next ones.
#[inline(always)]
fn sampled_stack(ctx: *mut core::ffi::c_void, slot: &mut SlabSiteSlot) -> u64 {
    // A failed walk (no user stack in a kernel thread) is remembered like a good one.
    if slot.stack_hits_left > 0 {
        slot.stack_hits_left -= 1;
        return slot.stack_id;
    }
    let id = capture_stacks(ctx);
    // SAFETY: no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    slot.stack_id = id;
    // At least 1: the walk just made counts as taken.
    slot.stack_hits_left = (random & (2 * SLAB_STACK_REWALK_MEAN - 1)).max(1) - 1;
    id
}

/// Captures the current kernel stack (`--stacks`) and the task's user stack
/// (`--user-stacks`) into `SLAB_STACKS`; returns their id, or 0 when nothing was captured.
#[inline(never)]
fn capture_stacks(ctx: *mut core::ffi::c_void) -> u64 {
    // An allocation in an interrupt can run another allocation program on this CPU while this
    // one walks: each nesting level has its own scratch.
    let Some(cpu) = SLAB_CPU.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's value from a successful lookup.
    let level = unsafe {
        let level = (*cpu).stack_depth;
        (*cpu).stack_depth = level + 1;
        level
    };
    let id = capture_stacks_at(ctx, level);
    // SAFETY: as above.
    unsafe { (*cpu).stack_depth = level };
    id
}

#[inline(always)]
fn capture_stacks_at(ctx: *mut core::ffi::c_void, level: u32) -> u64 {
    if level >= STACK_SCRATCH_LEVELS {
        bump(counter::SLAB_STACK_LOST);
        return 0;
    }
    let Some(scratch) = SLAB_STACK_SCRATCH.get_ptr_mut(level) else {
        return 0;
    };
    // SAFETY: a per-CPU value from a successful lookup, used by this CPU alone meanwhile.
    let stack = unsafe { &mut *scratch };
    let mut kernel = 0;
    if config!(slab_kernel_stacks) != 0 {
        // SAFETY: the buffer is the scratch value's kernel frames, of exactly the size passed.
        kernel = unsafe {
            bpf_get_stack(
                ctx,
                stack.frames.as_mut_ptr().cast(),
                (8 * SLAB_STACK_DEPTH) as u32,
                0,
            )
        };
    }
    let mut user = 0;
    if config!(slab_user_stacks) != 0 {
        // SAFETY: the buffer is the scratch value's user frames, of exactly the size passed.
        // (In an interrupt this is the user stack of the task it interrupted.)
        user = unsafe {
            bpf_get_stack(
                ctx,
                stack.user.as_mut_ptr().cast(),
                (8 * SLAB_USER_STACK_DEPTH) as u32,
                BPF_F_USER_STACK as u64,
            )
        };
    }
    if kernel <= 0 && user <= 0 {
        bump(counter::SLAB_STACK_LOST);
        return 0;
    }
    // Clear what the walks did not write, so equal stacks hash and compare equal.
    let kernel = (kernel.max(0) as usize / 8).min(SLAB_STACK_DEPTH);
    let mut i = 0;
    while i < SLAB_STACK_DEPTH {
        if i >= kernel {
            stack.frames[i] = 0;
        }
        i += 1;
    }
    let user = (user.max(0) as usize / 8).min(SLAB_USER_STACK_DEPTH);
    let mut i = 0;
    while i < SLAB_USER_STACK_DEPTH {
        if i >= user {
            stack.user[i] = 0;
        }
        i += 1;
    }
    let id = stack_hash(stack);
    // SAFETY: presence only.
    if unsafe { SLAB_STACKS.get(id) }.is_none() {
        if SLAB_STACKS.insert(id, &*stack, BPF_NOEXIST as u64).is_ok() {
            if user > 0 {
                announce_stack(id);
            }
        // SAFETY: presence only.
        } else if unsafe { SLAB_STACKS.get(id) }.is_none() {
            bump(counter::SLAB_STACKS_FULL);
        }
    }
    id
}

/// Tells the agent about a new stack with user frames, to symbolize them while the process
/// still runs.
#[inline(never)]
fn announce_stack(id: u64) {
    let rec = SlabStackRecord {
        kind: RecordKind::SlabStack as u32,
        pid: current_ids().0,
        id,
        // SAFETY: no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
    };
    if EVENTS.output::<SlabStackRecord>(&rec, 0).is_err() {
        bump(counter::RINGBUF_FULL_OTHER);
    }
}

#[inline(always)]
fn on_free(ptr: u64) {
    if ptr <= ZERO_SIZE_PTR {
        return;
    }
    // Whoever frees, from whatever context: the target filter is for allocations only. Nothing
    // is counted here (frees are allocations less what is outstanding), to keep the cheapest
    // and most frequent path short.
    untrack(ptr);
}
