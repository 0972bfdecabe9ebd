//! Who mapped what: every region mapped while traced, down to the byte, with the callsite
//! that mapped it. munmap and mremap cut and move regions piece by piece (a partial munmap
//! leaves two pieces of one mapping; the kernel merging neighbouring VMAs changes nothing
//! here), so each callsite's outstanding bytes stay exact.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use crate::{addrspace::MappingClass, stacks::StackId};

/// A callsite of mappings: one process's code path, mapping one kind of memory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub pid: u32,
    pub class: MappingClass,
    pub path: Option<Arc<str>>,
    /// The caller's user stack, in the ledger's stack tree.
    pub stack: Option<StackId>,
}

/// What one callsite mapped, unmapped and still holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    pub mapped_bytes: u64,
    pub unmapped_bytes: u64,
    /// Mapping calls (mmap, brk growth, mremap growth of an unknown region).
    pub mappings: u64,
    /// Mappings with bytes still mapped.
    pub outstanding_regions: u64,
    /// Faults that first touched a page of its mappings (`--faults`).
    pub touched_pages: u64,
}

impl SiteStats {
    pub fn outstanding_bytes(&self) -> u64 {
        self.mapped_bytes.saturating_sub(self.unmapped_bytes)
    }
}

/// One mapping call's memory: where its bytes are counted.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    site: u32,
    remaining: u64,
    created_ns: u64,
}

/// A contiguous piece of one mapping.
#[derive(Clone, Copy, Debug)]
struct Piece {
    end: u64,
    mapping: u64,
}

/// One process's mapped pieces, by start address; pieces never overlap.
#[derive(Debug, Default)]
pub struct ProcessLedger {
    pieces: BTreeMap<u64, Piece>,
    mappings: HashMap<u64, Mapping>,
    /// Its callsites.
    sites: Vec<u32>,
    /// The program break, once known.
    pub brk: Option<u64>,
    pub exited_ns: Option<u64>,
}

/// Exited processes whose mappings at exit are kept (with `keep_exited`); past it, the
/// oldest go, their figures kept only in [`Ledger::dropped`].
pub const EXITED_KEPT: usize = 1024;

/// Every traced process's mappings, and the callsites they count against.
#[derive(Debug, Default)]
pub struct Ledger {
    processes: HashMap<u32, ProcessLedger>,
    sites: HashMap<u32, (SiteKey, SiteStats)>,
    site_index: HashMap<SiteKey, u32>,
    next_site: u32,
    next_mapping: u64,
    /// What exited processes held at exit stays counted (the traced command's leaks);
    /// otherwise (system-wide) exit unmaps it all and the process's rows go.
    pub keep_exited: bool,
    /// Exited processes kept, oldest first.
    exited_order: std::collections::VecDeque<u32>,
    /// Totals of callsites dropped with their exited processes.
    pub dropped: SiteStats,
    /// Processes dropped since the owner last looked (to forget what it keeps per process).
    pub comms_dropped: Vec<u32>,
    /// Bytes unmapped that were mapped before tracing began (no callsite to count them on).
    pub unmapped_untracked: u64,
    pub calls: Calls,
}

/// Calls seen, by syscall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Calls {
    pub mmap: u64,
    pub munmap: u64,
    pub mremap: u64,
    pub brk: u64,
}

impl Ledger {
    /// `keep_exited`: see [`Ledger::keep_exited`].
    pub fn new(keep_exited: bool) -> Self {
        Self {
            keep_exited,
            ..Self::default()
        }
    }

    pub fn site(&mut self, key: SiteKey) -> u32 {
        if let Some(&i) = self.site_index.get(&key) {
            return i;
        }
        let i = self.next_site;
        self.next_site += 1;
        self.processes.entry(key.pid).or_default().sites.push(i);
        self.sites.insert(i, (key.clone(), SiteStats::default()));
        self.site_index.insert(key, i);
        i
    }

    /// Every callsite with its id.
    pub fn sites(&self) -> impl Iterator<Item = (u32, &SiteKey, &SiteStats)> {
        self.sites.iter().map(|(&id, (k, s))| (id, k, s))
    }

    fn stats_mut(&mut self, site: u32) -> Option<&mut SiteStats> {
        self.sites.get_mut(&site).map(|(_, s)| s)
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessLedger> {
        self.processes.get(&pid)
    }

    /// The oldest outstanding mapping's creation time per site.
    pub fn oldest_outstanding(&self) -> HashMap<u32, u64> {
        let mut oldest: HashMap<u32, u64> = HashMap::new();
        for p in self.processes.values() {
            for m in p.mappings.values() {
                let e = oldest.entry(m.site).or_insert(m.created_ns);
                *e = (*e).min(m.created_ns);
            }
        }
        oldest
    }

    /// When each process exited, for ages of what it held at exit.
    pub fn exit_times(&self) -> HashMap<u32, u64> {
        self.processes
            .iter()
            .filter_map(|(&pid, p)| Some((pid, p.exited_ns?)))
            .collect()
    }

    /// `len` bytes at `start` mapped by `site` at `time_ns` (replacing whatever was there:
    /// MAP_FIXED over a mapping unmaps it).
    pub fn map(&mut self, pid: u32, start: u64, len: u64, site: u32, time_ns: u64) {
        if len == 0 {
            return;
        }
        self.cut(pid, start, len, false);
        let id = self.next_mapping;
        self.next_mapping += 1;
        let p = self.processes.entry(pid).or_default();
        p.pieces.insert(
            start,
            Piece {
                end: start + len,
                mapping: id,
            },
        );
        p.mappings.insert(
            id,
            Mapping {
                site,
                remaining: len,
                created_ns: time_ns,
            },
        );
        if let Some(stats) = self.stats_mut(site) {
            stats.mapped_bytes += len;
            stats.mappings += 1;
            stats.outstanding_regions += 1;
        }
    }

    /// Takes `[start, start + len)` out of the pieces: each piece's bytes are unmapped from
    /// its mapping's site; bytes of no piece were mapped before tracing.
    pub fn unmap_range(&mut self, pid: u32, start: u64, len: u64) {
        self.cut(pid, start, len, true);
    }

    /// Per-callsite figures, for interval reports' baselines.
    pub fn site_stats(&self, site: u32) -> Option<&SiteStats> {
        self.sites.get(&site).map(|(_, s)| s)
    }

    /// Unmaps the pieces in `[start, start + len)`; `untracked`: count what no piece covered
    /// as unmapped memory of before tracing (a munmap), or not (a mapping placed there).
    /// Returns the bytes pieces covered.
    fn cut(&mut self, pid: u32, start: u64, len: u64, untracked: bool) -> u64 {
        let end = start.saturating_add(len);
        let Some(p) = self.processes.get_mut(&pid) else {
            if untracked {
                self.unmapped_untracked += len;
            }
            return 0;
        };
        // Pieces that overlap: the one starting before `start` (if it reaches in), and those
        // starting inside.
        let mut hit: Vec<(u64, Piece)> = Vec::new();
        if let Some((&s, &piece)) = p.pieces.range(..start).next_back() {
            if piece.end > start {
                hit.push((s, piece));
            }
        }
        hit.extend(p.pieces.range(start..end).map(|(&s, &piece)| (s, piece)));
        let mut covered = 0;
        for (s, piece) in hit {
            p.pieces.remove(&s);
            // What stays on either side.
            if s < start {
                p.pieces.insert(
                    s,
                    Piece {
                        end: start,
                        mapping: piece.mapping,
                    },
                );
            }
            if piece.end > end {
                p.pieces.insert(
                    end,
                    Piece {
                        end: piece.end,
                        mapping: piece.mapping,
                    },
                );
            }
            let (cut_start, cut_end) = (s.max(start), piece.end.min(end));
            let cut = cut_end - cut_start;
            covered += cut;
            if let Some(m) = p.mappings.get_mut(&piece.mapping) {
                m.remaining = m.remaining.saturating_sub(cut);
                let (site, gone) = (m.site, m.remaining == 0);
                if gone {
                    p.mappings.remove(&piece.mapping);
                }
                if let Some((_, stats)) = self.sites.get_mut(&site) {
                    stats.unmapped_bytes += cut;
                    if gone {
                        stats.outstanding_regions = stats.outstanding_regions.saturating_sub(1);
                    }
                }
            }
        }
        if untracked {
            self.unmapped_untracked += len - covered.min(len);
        }
        covered
    }

    /// Splits the piece that spans `addr`, if one does, into two at `addr`.
    fn split_at(&mut self, pid: u32, addr: u64) {
        let Some(p) = self.processes.get_mut(&pid) else {
            return;
        };
        if let Some((&s, &piece)) = p.pieces.range(..addr).next_back() {
            if piece.end > addr {
                p.pieces.insert(
                    s,
                    Piece {
                        end: addr,
                        mapping: piece.mapping,
                    },
                );
                p.pieces.insert(addr, piece);
            }
        }
    }

    /// munmap of `len` bytes at `start`, of which the agent's model of the address space had
    /// `mapped` bytes mapped (`None`: unknown, take the whole range): what no piece held was
    /// mapped before tracing.
    pub fn munmap(&mut self, pid: u32, start: u64, len: u64, mapped: Option<u64>) {
        self.calls.munmap += 1;
        let len = page_align(len);
        let covered = self.cut(pid, start, len, false);
        self.unmapped_untracked += mapped.unwrap_or(len).saturating_sub(covered);
    }

    pub fn mmap(&mut self, pid: u32, start: u64, len: u64, site: u32, time_ns: u64) {
        self.calls.mmap += 1;
        self.map(pid, start, page_align(len), site, time_ns);
    }

    /// mremap: the pieces of `[old, old + old_len)` move to `new` (a shrink unmaps the
    /// tail first); growth counts for the mapping at the old end, or, when that one was
    /// mapped before tracing, as a new mapping of `site`.
    pub fn mremap(
        &mut self,
        pid: u32,
        (old, old_len): (u64, u64),
        (new, new_len): (u64, u64),
        site: impl FnOnce(&mut Self) -> u32,
        time_ns: u64,
    ) {
        self.calls.mremap += 1;
        let (old_len, new_len) = (page_align(old_len), page_align(new_len));
        if new_len < old_len {
            self.unmap_range(pid, old + new_len, old_len - new_len);
        }
        let kept = old_len.min(new_len);
        self.split_at(pid, old);
        self.split_at(pid, old + kept);
        // Move the kept pieces without counting them unmapped and mapped again.
        let moved: Vec<(u64, Piece)> = match self.processes.get_mut(&pid) {
            Some(p) => {
                let starts: Vec<u64> = p.pieces.range(old..old + kept).map(|(&s, _)| s).collect();
                starts
                    .into_iter()
                    .filter_map(|s| p.pieces.remove(&s).map(|piece| (s, piece)))
                    .collect()
            }
            None => Vec::new(),
        };
        let last_mapping = moved
            .last()
            .filter(|(_, pc)| pc.end == old + kept)
            .map(|(_, pc)| pc.mapping);
        // Whatever was at the destination is replaced (MREMAP_FIXED).
        self.cut(pid, new, new_len, false);
        let p = self.processes.entry(pid).or_default();
        for (s, piece) in moved {
            p.pieces.insert(
                s - old + new,
                Piece {
                    end: piece.end - old + new,
                    mapping: piece.mapping,
                },
            );
        }
        if new_len > old_len {
            let grow_at = new + old_len;
            let grow = new_len - old_len;
            match last_mapping.and_then(|id| p.mappings.get_mut(&id).map(|m| (id, m))) {
                Some((id, m)) => {
                    m.remaining += grow;
                    let site = m.site;
                    p.pieces.insert(
                        grow_at,
                        Piece {
                            end: grow_at + grow,
                            mapping: id,
                        },
                    );
                    if let Some((_, stats)) = self.sites.get_mut(&site) {
                        stats.mapped_bytes += grow;
                    }
                }
                None => {
                    let site = site(self);
                    self.map(pid, grow_at, grow, site, time_ns);
                }
            }
        }
    }

    /// brk moved the break to `new_brk`; `before` is the break before, when the agent's model
    /// knew it (the first brk seen of a process otherwise only sets the baseline).
    pub fn brk(
        &mut self,
        pid: u32,
        new_brk: u64,
        before: Option<u64>,
        site: impl FnOnce(&mut Self) -> u32,
        time_ns: u64,
    ) {
        self.calls.brk += 1;
        let p = self.processes.entry(pid).or_default();
        // The model knows the break only to the page: a first brk at or below it sets the
        // baseline (its shrink within the last page is not known to the byte).
        let old = match (p.brk, before) {
            (Some(b), _) => Some(b),
            (None, Some(model)) if new_brk > model => Some(model),
            _ => None,
        };
        p.brk = Some(new_brk);
        match old {
            Some(old) if new_brk > old => {
                let site = site(self);
                self.map(pid, old, new_brk - old, site, time_ns);
            }
            Some(old) if new_brk < old => {
                self.unmap_range(pid, new_brk, old - new_brk);
            }
            _ => {}
        }
    }

    /// A fault that first touched a page at `addr`: counted for the mapping's site.
    pub fn touched(&mut self, pid: u32, addr: u64) {
        let Some(p) = self.processes.get(&pid) else {
            return;
        };
        let Some((_, piece)) = p.pieces.range(..=addr).next_back() else {
            return;
        };
        if addr >= piece.end {
            return;
        }
        if let Some(m) = p.mappings.get(&piece.mapping) {
            if let Some((_, stats)) = self.sites.get_mut(&m.site) {
                stats.touched_pages += 1;
            }
        }
    }

    /// A process exited. With `keep_exited`, what it still had mapped stays counted, as held
    /// at exit; otherwise its rows go (into [`Ledger::dropped`]).
    pub fn exited(&mut self, pid: u32, time_ns: u64) {
        let Some(p) = self.processes.get_mut(&pid) else {
            return;
        };
        if p.exited_ns.is_some() {
            return;
        }
        p.exited_ns = Some(time_ns);
        p.pieces.clear();
        if !self.keep_exited {
            self.drop_process(pid);
            return;
        }
        self.exited_order.push_back(pid);
        while self.exited_order.len() > EXITED_KEPT {
            if let Some(old) = self.exited_order.pop_front() {
                self.drop_process(old);
            }
        }
    }

    /// Forgets a process, its callsites' figures kept in the totals of the dropped.
    fn drop_process(&mut self, pid: u32) {
        let Some(p) = self.processes.remove(&pid) else {
            return;
        };
        self.comms_dropped.push(pid);
        for site in p.sites {
            if let Some((key, stats)) = self.sites.remove(&site) {
                self.site_index.remove(&key);
                let d = &mut self.dropped;
                d.mapped_bytes += stats.mapped_bytes;
                d.unmapped_bytes += stats.unmapped_bytes;
                d.mappings += stats.mappings;
                d.outstanding_regions += stats.outstanding_regions;
                d.touched_pages += stats.touched_pages;
            }
        }
    }

    /// exec: the old image's memory is gone, unmapped with it.
    pub fn exec(&mut self, pid: u32) {
        let ranges: Vec<(u64, u64)> = match self.processes.get(&pid) {
            Some(p) => p.pieces.iter().map(|(&s, pc)| (s, pc.end - s)).collect(),
            None => return,
        };
        for (start, len) in ranges {
            self.unmap_range(pid, start, len);
        }
        if let Some(p) = self.processes.get_mut(&pid) {
            p.brk = None;
        }
    }

    /// fork: the child holds copies of its parent's mappings, mapped before it existed: they
    /// are not its callsites' doing, so it starts with none.
    pub fn forked(&mut self, child: u32) {
        self.drop_process(child);
        // A reused pid: the exited process it was is gone with it.
        self.exited_order.retain(|&p| p != child);
    }
}

fn page_align(len: u64) -> u64 {
    len.saturating_add(4095) & !4095
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u32 = 7;

    fn key(class: MappingClass, tag: u32) -> SiteKey {
        SiteKey {
            pid: P,
            class,
            path: Some(Arc::from(format!("site{tag}"))),
            stack: None,
        }
    }

    fn stats(l: &Ledger, site: u32) -> SiteStats {
        l.sites().find(|(id, _, _)| *id == site).unwrap().2.clone()
    }

    #[test]
    fn regions_mapped_and_never_unmapped_are_outstanding() {
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        for i in 0..10 {
            l.mmap(P, 0x10_0000 + i * 0x10_0000, 65536, a, 5);
        }
        let s = stats(&l, a);
        assert_eq!(s.outstanding_bytes(), 10 * 65536);
        assert_eq!(s.outstanding_regions, 10);
        assert_eq!(s.mappings, 10);
        for i in 0..10 {
            l.munmap(P, 0x10_0000 + i * 0x10_0000, 65536, None);
        }
        let s = stats(&l, a);
        assert_eq!((s.outstanding_bytes(), s.outstanding_regions), (0, 0));
        assert_eq!(s.unmapped_bytes, 10 * 65536);
        assert_eq!(l.unmapped_untracked, 0);
    }

    #[test]
    fn partial_unmaps_and_holes_are_exact() {
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        // 16 pages; punch a hole of 4 in the middle, then unmap the head.
        l.mmap(P, 0x10000, 16 * 4096, a, 0);
        l.munmap(P, 0x10000 + 6 * 4096, 4 * 4096, None);
        let s = stats(&l, a);
        assert_eq!(s.outstanding_bytes(), 12 * 4096);
        assert_eq!(s.outstanding_regions, 1, "two pieces, one mapping");
        l.munmap(P, 0x10000, 6 * 4096, None);
        // A munmap across the rest and beyond: what was not mapped while traced is apart,
        // as much of it as the model says was mapped (here, all of it).
        l.munmap(P, 0x10000 + 10 * 4096, 20 * 4096, None);
        let s = stats(&l, a);
        assert_eq!((s.outstanding_bytes(), s.outstanding_regions), (0, 0));
        assert_eq!(l.unmapped_untracked, 14 * 4096);
        // A length that is not a page multiple unmaps whole pages, as the kernel does.
        l.mmap(P, 0x90000, 100, a, 0);
        assert_eq!(stats(&l, a).outstanding_bytes(), 4096);
        l.munmap(P, 0x90000, 1, None);
        // Unmapping a range nothing mapped counts nothing.
        l.munmap(P, 0x4000_0000, 64 << 20, Some(0));
        assert_eq!(l.unmapped_untracked, 14 * 4096);
        assert_eq!(stats(&l, a).outstanding_bytes(), 0);
    }

    #[test]
    fn map_fixed_over_a_mapping_unmaps_it_from_its_site() {
        let mut l = Ledger::default();
        let (a, b) = (
            l.site(key(MappingClass::AnonPrivate, 1)),
            l.site(key(MappingClass::FilePrivate, 2)),
        );
        l.mmap(P, 0x10000, 8 * 4096, a, 0);
        l.mmap(P, 0x12000, 2 * 4096, b, 0);
        assert_eq!(stats(&l, a).outstanding_bytes(), 6 * 4096);
        assert_eq!(stats(&l, b).outstanding_bytes(), 2 * 4096);
        assert_eq!(l.unmapped_untracked, 0);
    }

    #[test]
    fn mremap_moves_grows_and_shrinks() {
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        let other = l.site(key(MappingClass::AnonPrivate, 9));
        l.mmap(P, 0x10000, 4 * 4096, a, 0);
        // Grows and moves: the growth counts for the mapping's own site.
        l.mremap(P, (0x10000, 4 * 4096), (0x80000, 10 * 4096), |_| other, 1);
        let s = stats(&l, a);
        assert_eq!(
            (s.outstanding_bytes(), s.outstanding_regions),
            (10 * 4096, 1)
        );
        assert_eq!(s.unmapped_bytes, 0, "a move is not an unmap");
        assert_eq!(stats(&l, other).mapped_bytes, 0);
        // The old place is empty, the new one holds it all.
        l.munmap(P, 0x10000, 4 * 4096, Some(0));
        assert_eq!(stats(&l, a).outstanding_bytes(), 10 * 4096);
        // Shrinks in place.
        l.mremap(P, (0x80000, 10 * 4096), (0x80000, 3 * 4096), |_| other, 2);
        assert_eq!(stats(&l, a).outstanding_bytes(), 3 * 4096);
        l.munmap(P, 0x80000, 3 * 4096, None);
        assert_eq!(stats(&l, a).outstanding_bytes(), 0);
        // Growing a region mapped before tracing: a new mapping of the mremap's site.
        l.mremap(P, (0x200000, 4096), (0x200000, 3 * 4096), |_| other, 3);
        assert_eq!(stats(&l, other).outstanding_bytes(), 2 * 4096);
    }

    #[test]
    fn mremap_of_part_of_a_mapping() {
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        l.mmap(P, 0x10000, 8 * 4096, a, 0);
        // The second half moves away (after an mprotect split it into its own VMA).
        l.mremap(P, (0x14000, 4 * 4096), (0x90000, 4 * 4096), |_| a, 1);
        l.munmap(P, 0x10000, 4 * 4096, None);
        let s = stats(&l, a);
        assert_eq!(
            (s.outstanding_bytes(), s.outstanding_regions),
            (4 * 4096, 1)
        );
        l.munmap(P, 0x90000, 4 * 4096, None);
        assert_eq!(stats(&l, a).outstanding_regions, 0);
    }

    #[test]
    fn brk_growth_is_byte_exact_heap() {
        let mut l = Ledger::default();
        let h = l.site(key(MappingClass::Heap, 1));
        // The first brk (brk(0)) only tells where the break is.
        l.brk(P, 0x50_0000, None, |_| h, 0);
        l.brk(P, 0x50_0000 + 135_168, None, |_| h, 1);
        l.brk(P, 0x50_0000 + 200_000, None, |_| h, 2);
        assert_eq!(stats(&l, h).outstanding_bytes(), 200_000);
        l.brk(P, 0x50_0000 + 50_000, None, |_| h, 3);
        assert_eq!(stats(&l, h).outstanding_bytes(), 50_000);
        // Attached mid-life: the model's break is the baseline.
        l.brk(
            P + 1,
            0x70_0000,
            Some(0x6f_0000),
            |l| {
                l.site(SiteKey {
                    pid: P + 1,
                    ..key(MappingClass::Heap, 2)
                })
            },
            4,
        );
        assert_eq!(l.sites().filter(|(_, k, _)| k.pid == P + 1).count(), 1);
        // The model knows the break to the page only: a first brk below it is the baseline,
        // not a shrink of bytes never seen mapped.
        l.brk(P + 2, 0x7f_0100, Some(0x7f_1000), |_| h, 5);
        assert_eq!(l.unmapped_untracked, 0);
        l.brk(P + 2, 0x7f_0200, Some(0x7f_1000), |_| h, 6);
        assert_eq!(stats(&l, h).outstanding_bytes(), 50_000 + 0x100);
    }

    #[test]
    fn faults_touch_pages_of_their_mapping() {
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        l.mmap(P, 0x10000, 8 * 4096, a, 0);
        for page in 0..3 {
            l.touched(P, 0x10000 + page * 4096 + 12);
        }
        l.touched(P, 0x10000 + 8 * 4096);
        assert_eq!(stats(&l, a).touched_pages, 3);
    }

    #[test]
    fn exit_keeps_or_drops_what_was_held() {
        let mut l = Ledger::new(true);
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        l.mmap(P, 0x10000, 4096, a, 0);
        l.exited(P, 10);
        assert_eq!(stats(&l, a).outstanding_bytes(), 4096);
        assert_eq!(l.exit_times().get(&P), Some(&10));
        let mut l = Ledger::default();
        let a = l.site(key(MappingClass::AnonPrivate, 1));
        l.mmap(P, 0x10000, 4096, a, 0);
        l.exited(P, 10);
        assert_eq!(l.sites().count(), 0);
        assert_eq!(l.dropped.mapped_bytes, 4096);
    }
}
