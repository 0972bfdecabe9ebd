//! `memtrace slab`: outstanding kernel slab objects grouped by callsite, cache, process or
//! stack, with their ages, growth between reports and the kernel's own slabinfo beside them.
//!
//! The kernel programs keep every outstanding object in a map under its address; a report
//! reads that map in bulk ([`outstanding`]) and folds it into groups ([`Aggregate`]).
pub mod caches;
pub mod outstanding;
pub mod report;

use std::collections::HashMap;

use memtrace_common::{SlabAlloc, SLAB_KMALLOC};

pub use report::{render, SlabReport};

/// What rows a report groups outstanding objects into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The allocating call site and the cache.
    Callsite,
    Cache,
    /// The allocating process.
    Process,
    /// The allocation's kernel stack and cache (needs --stacks).
    Stack,
}

/// Upper bounds (ms) of the age histogram's buckets; the last one is open.
pub const AGE_BUCKETS_MS: [u64; 7] = [10, 100, 1_000, 10_000, 60_000, 600_000, 3_600_000];
pub const AGE_BUCKETS: usize = AGE_BUCKETS_MS.len() + 1;

/// The histogram bucket of an age in ms.
pub fn age_bucket(age_ms: u64) -> usize {
    AGE_BUCKETS_MS.partition_point(|&le| le <= age_ms)
}

/// A field of a group that its objects may share (one pid, one cache) or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum One<T> {
    #[default]
    None,
    One(T),
    Many,
}

impl<T: PartialEq + Copy> One<T> {
    pub fn add(&mut self, v: T) {
        *self = match *self {
            One::None => One::One(v),
            One::One(x) if x == v => One::One(x),
            _ => One::Many,
        };
    }

    pub fn get(&self) -> Option<T> {
        match *self {
            One::One(v) => Some(v),
            _ => None,
        }
    }
}

/// A group's key: (call site, cache), (cache, 0), (pid, 0) or (stack, cache).
pub type GroupKey = (u64, u64);

pub fn group_key(by: GroupBy, a: &SlabAlloc) -> GroupKey {
    match by {
        GroupBy::Callsite => (a.call_site, a.cache),
        GroupBy::Cache => (a.cache, 0),
        GroupBy::Process => (a.pid as u64, 0),
        GroupBy::Stack => (a.stack_id, a.cache),
    }
}

/// The outstanding objects of one group.
#[derive(Clone, Debug, Default)]
pub struct GroupAcc {
    /// Objects shown: old enough for `--min-age`.
    pub objects: u64,
    pub bytes: u64,
    pub requested_bytes: u64,
    /// Every outstanding object of the group, however young.
    pub all_objects: u64,
    /// Those allocated by [`Fold::counted_until`] (frees count these against the site counts
    /// read then).
    pub counted: u64,
    /// Objects shown that are at least [`Fold::settle_ns`] old: growth counts these, so objects
    /// in flight (an RCU grace period, a request in progress) do not register as growth.
    pub settled: u64,
    /// Allocation time of the oldest object shown (`CLOCK_MONOTONIC` ns).
    pub oldest_ns: Option<u64>,
    pub ages: [u64; AGE_BUCKETS],
    pub pid: One<u32>,
    pub call_site: One<u64>,
    pub cache: One<u64>,
    /// The group's stacks: objects, and a process that allocated there (for its user frames).
    pub stacks: HashMap<u64, (u64, u32)>,
}

/// Per cache: objects outstanding (every one, whatever `--min-age`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheAcc {
    pub objects: u64,
    pub bytes: u64,
}

/// Sizes of kmem_caches, by cache id, for objects whose record carries none.
pub trait CacheSizes {
    /// (object size, allocated size) of a kmem_cache object.
    fn sizes(&self, cache: u64) -> (u32, u32);
}

impl CacheSizes for HashMap<u64, (u32, u32)> {
    fn sizes(&self, cache: u64) -> (u32, u32) {
        self.get(&cache).copied().unwrap_or((0, 0))
    }
}

/// The outstanding map folded into groups and caches.
#[derive(Debug, Default)]
pub struct Aggregate {
    pub groups: HashMap<GroupKey, GroupAcc>,
    pub caches: HashMap<u64, CacheAcc>,
    /// Every outstanding object that passed the cache filter.
    pub objects: u64,
    pub bytes: u64,
    /// Of those, the ones allocated by [`Fold::counted_until`].
    pub counted: u64,
    /// Stacks referenced by any outstanding object (kept in the kernel's stack map).
    pub stacks_in_use: HashMap<u64, u64>,
}

/// How a report folds objects.
#[derive(Clone, Copy, Debug)]
pub struct Fold {
    pub by: GroupBy,
    /// Objects younger than this are counted but not shown.
    pub min_age_ns: u64,
    /// Objects younger than this do not count as growth.
    pub settle_ns: u64,
    /// When the site counts were read: objects allocated later are not in them.
    pub counted_until: u64,
    /// Now, on the kernel's clock (`CLOCK_MONOTONIC` ns).
    pub now_ns: u64,
    pub stacks: bool,
}

impl Aggregate {
    /// Adds one outstanding object.
    pub fn add(&mut self, a: &SlabAlloc, fold: &Fold, sizes: &impl CacheSizes) {
        let (requested, allocated) = if a.flags & SLAB_KMALLOC != 0 {
            (a.bytes_req as u64, a.bytes_alloc as u64)
        } else {
            let (object, size) = sizes.sizes(a.cache);
            (object as u64, size as u64)
        };
        self.objects += 1;
        self.bytes += allocated;
        let cache = self.caches.entry(a.cache).or_default();
        cache.objects += 1;
        cache.bytes += allocated;
        if a.stack_id != 0 {
            *self.stacks_in_use.entry(a.stack_id).or_default() += 1;
        }
        let g = self.groups.entry(group_key(fold.by, a)).or_default();
        g.all_objects += 1;
        if a.time_ns <= fold.counted_until {
            g.counted += 1;
            self.counted += 1;
        }
        let age_ns = fold.now_ns.saturating_sub(a.time_ns);
        if age_ns < fold.min_age_ns {
            return;
        }
        g.objects += 1;
        if age_ns >= fold.settle_ns {
            g.settled += 1;
        }
        g.bytes += allocated;
        g.requested_bytes += requested;
        g.oldest_ns = Some(g.oldest_ns.map_or(a.time_ns, |t| t.min(a.time_ns)));
        g.ages[age_bucket(age_ns / 1_000_000)] += 1;
        g.pid.add(a.pid);
        g.call_site.add(a.call_site);
        g.cache.add(a.cache);
        if fold.stacks && a.stack_id != 0 {
            g.stacks.entry(a.stack_id).or_insert((0, a.pid)).0 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(call_site: u64, cache: u64, pid: u32, time_ms: u64, bytes: u32) -> SlabAlloc {
        SlabAlloc {
            time_ns: time_ms * 1_000_000,
            call_site,
            cache,
            pid,
            tid: pid,
            bytes_req: bytes,
            bytes_alloc: bytes,
            flags: if bytes > 0 { SLAB_KMALLOC } else { 0 },
            ..SlabAlloc::default()
        }
    }

    #[test]
    fn ages_fall_into_decade_buckets() {
        assert_eq!(age_bucket(0), 0);
        assert_eq!(age_bucket(9), 0);
        assert_eq!(age_bucket(10), 1);
        assert_eq!(age_bucket(999), 2);
        assert_eq!(age_bucket(1_000), 3);
        assert_eq!(age_bucket(7_200_000), AGE_BUCKETS - 1);
    }

    #[test]
    fn groups_by_callsite_count_sizes_and_ages() {
        let sizes: HashMap<u64, (u32, u32)> = [(0xffff_0001, (1100, 1152))].into();
        let fold = Fold {
            by: GroupBy::Callsite,
            min_age_ns: 0,
            settle_ns: 1_000 * 1_000_000,
            now_ns: 10_000 * 1_000_000,
            counted_until: 9_000 * 1_000_000,
            stacks: false,
        };
        let mut agg = Aggregate::default();
        agg.add(&alloc(0xa, 192, 7, 9_990, 192), &fold, &sizes);
        agg.add(&alloc(0xa, 192, 8, 5_000, 192), &fold, &sizes);
        agg.add(&alloc(0xb, 0xffff_0001, 7, 9_000, 0), &fold, &sizes);
        assert_eq!(agg.objects, 3);
        assert_eq!(agg.bytes, 192 * 2 + 1152);
        let a = &agg.groups[&(0xa, 192)];
        assert_eq!((a.objects, a.bytes, a.all_objects), (2, 384, 2));
        assert_eq!(a.settled, 1, "only the 5 s old object has settled");
        assert_eq!(
            a.counted, 1,
            "the other came after the site counts were read"
        );
        assert_eq!(agg.counted, 2);
        assert_eq!(a.pid, One::Many);
        assert_eq!(a.call_site.get(), Some(0xa));
        assert_eq!(a.oldest_ns, Some(5_000 * 1_000_000));
        assert_eq!(a.ages[age_bucket(10)], 1);
        assert_eq!(a.ages[age_bucket(5_000)], 1);
        let b = &agg.groups[&(0xb, 0xffff_0001)];
        assert_eq!((b.bytes, b.requested_bytes), (1152, 1100));
        assert_eq!(b.pid.get(), Some(7));
        assert_eq!(
            agg.caches[&0xffff_0001],
            CacheAcc {
                objects: 1,
                bytes: 1152
            }
        );
    }

    #[test]
    fn min_age_hides_young_objects_but_counts_them() {
        let fold = Fold {
            by: GroupBy::Process,
            min_age_ns: 1_000 * 1_000_000,
            settle_ns: 1_000 * 1_000_000,
            now_ns: 10_000 * 1_000_000,
            counted_until: 10_000 * 1_000_000,
            stacks: false,
        };
        let mut agg = Aggregate::default();
        let sizes = HashMap::new();
        agg.add(&alloc(0xa, 64, 7, 9_500, 64), &fold, &sizes); // 0.5 s old: hidden
        agg.add(&alloc(0xa, 64, 7, 2_000, 64), &fold, &sizes); // 8 s old: shown
        let g = &agg.groups[&(7, 0)];
        assert_eq!((g.objects, g.all_objects), (1, 2));
        assert_eq!(g.oldest_ns, Some(2_000 * 1_000_000));
        assert_eq!(agg.objects, 2, "totals count every object");
    }

    #[test]
    fn one_tracks_whether_a_group_shares_a_value() {
        let mut one = One::default();
        assert_eq!(one.get(), None);
        one.add(3u32);
        one.add(3);
        assert_eq!(one.get(), Some(3));
        one.add(4);
        assert_eq!(one, One::Many);
        one.add(3);
        assert_eq!(one.get(), None);
    }
}
