//! A process's address space as the agent models it: the VMAs of `/proc/PID/maps`, read when
//! the process is first seen and kept current from mmap/munmap/mremap/brk records.
//!
//! The kernel does not let BPF read VMAs under lockdown, so this model is how a fault address
//! gets its mapping class, and how user stacks still symbolize after the process has exited.
use std::{collections::BTreeMap, fmt, path::Path, sync::Arc};

use serde::Serialize;

/// What kind of memory a fault hit (see DESIGN.md: the four kinds, plus heap and stack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingClass {
    Heap,
    Stack,
    AnonPrivate,
    /// Shared anonymous memory, shmem, tmpfs, memfd, SysV shm.
    AnonShared,
    FilePrivate,
    FileShared,
    /// vdso, vvar, vsyscall, or an address outside every known VMA.
    Other,
}

impl MappingClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Heap => "heap",
            Self::Stack => "stack",
            Self::AnonPrivate => "anon_private",
            Self::AnonShared => "anon_shared",
            Self::FilePrivate => "file_private",
            Self::FileShared => "file_shared",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for MappingClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`, in bytes.
    pub offset: u64,
    pub class: MappingClass,
    /// Backing file or pseudo-path (`[heap]`, `/dev/shm/x`); shared between split VMAs.
    pub path: Option<Arc<str>>,
    /// Mapped executable: only such memory can hold a return address.
    pub exec: bool,
}

impl Vma {
    /// A mapping as a perf `PERF_RECORD_MMAP2` names it: `path` without the " (deleted)"
    /// suffix and `None` for "//anon"; `pgoff` in bytes.
    pub fn from_perf(
        start: u64,
        end: u64,
        pgoff: u64,
        inode: u64,
        (exec, shared): (bool, bool),
        path: Option<Arc<str>>,
    ) -> Self {
        let class = classify(shared, inode, path.as_deref());
        let file_backed = matches!(class, MappingClass::FilePrivate | MappingClass::FileShared)
            || (class == MappingClass::AnonShared && path.is_some());
        Self {
            start,
            end,
            offset: if file_backed { pgoff } else { 0 },
            class,
            path,
            exec,
        }
    }

    /// The file offset of `addr` inside this VMA (for symbolizing file-backed code).
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// mmap flag and protection bits the model needs (x86_64 values).
pub mod mmap_flags {
    pub const MAP_SHARED: u32 = 0x01;
    pub const MAP_SHARED_VALIDATE: u32 = 0x03;
    pub const MAP_ANONYMOUS: u32 = 0x20;
    pub const MAP_STACK: u32 = 0x20000;
    pub const PROT_EXEC: u32 = 0x4;
}

fn is_shmem_path(path: &str) -> bool {
    path.starts_with("/dev/shm/")
        || path.starts_with("/memfd:")
        || path.starts_with("/SYSV")
        || path.starts_with("/dev/zero")
        || path.starts_with("[anon_shmem")
}

/// Classifies a `/proc/PID/maps` line's permission flag and path.
pub fn classify(shared: bool, inode: u64, path: Option<&str>) -> MappingClass {
    match path {
        Some("[heap]") => MappingClass::Heap,
        Some(p) if p.starts_with("[stack") => MappingClass::Stack,
        Some(p) if is_shmem_path(p) => MappingClass::AnonShared,
        Some(p) if p.starts_with('[') => MappingClass::Other,
        Some(_) if inode != 0 => {
            if shared {
                MappingClass::FileShared
            } else {
                MappingClass::FilePrivate
            }
        }
        // Anonymous (no path, or "[anon:name]" handled above as Other).
        _ if shared => MappingClass::AnonShared,
        _ => MappingClass::AnonPrivate,
    }
}

/// Parses one line of `/proc/PID/maps`.
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().map(str::trim_start).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let shared = perms.as_bytes().get(3) == Some(&b's');
    let path = path.map(|p| p.strip_suffix(" (deleted)").unwrap_or(p));
    Some(Vma {
        start,
        end,
        offset,
        class: classify(shared, inode, path),
        path: path.map(Arc::from),
        exec: perms.as_bytes().get(2) == Some(&b'x'),
    })
}

/// The modelled VMAs of one process, keyed by start address; ranges never overlap.
#[derive(Clone, Debug, Default)]
pub struct AddressSpace {
    vmas: BTreeMap<u64, Vma>,
    /// Start of the brk heap, once known (from `[heap]` or the first brk record).
    heap_start: Option<u64>,
}

impl AddressSpace {
    pub fn from_maps(text: &str) -> Self {
        let mut space = Self::default();
        for vma in text.lines().filter_map(parse_maps_line) {
            if vma.class == MappingClass::Heap {
                space.heap_start = Some(vma.start);
            }
            space.vmas.insert(vma.start, vma);
        }
        space
    }

    pub fn read(pid: u32) -> std::io::Result<Self> {
        Ok(Self::from_maps(&std::fs::read_to_string(format!(
            "/proc/{pid}/maps"
        ))?))
    }

    pub fn len(&self) -> usize {
        self.vmas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vmas.is_empty()
    }

    pub fn vmas(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// The VMA containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// Removes `[start, end)`, splitting VMAs that straddle its edges.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // VMAs that overlap: the one starting before `start` (if it reaches past it) and
        // every one starting inside the range.
        let mut overlapping: Vec<u64> = self.vmas.range(start..end).map(|(k, _)| *k).collect();
        if let Some((k, v)) = self.vmas.range(..start).next_back() {
            if v.end > start {
                overlapping.push(*k);
            }
        }
        for key in overlapping {
            let Some(vma) = self.vmas.remove(&key) else {
                continue;
            };
            if vma.start < start {
                let mut head = vma.clone();
                head.end = start;
                self.vmas.insert(head.start, head);
            }
            if vma.end > end {
                let mut tail = vma.clone();
                tail.offset = vma.file_offset(end);
                tail.start = end;
                self.vmas.insert(tail.start, tail);
            }
        }
    }

    /// Inserts a VMA, replacing whatever it overlaps (as MAP_FIXED does).
    pub fn insert(&mut self, vma: Vma) {
        self.remove_range(vma.start, vma.end);
        self.vmas.insert(vma.start, vma);
    }

    /// Adds a mapping the kernel reported (replacing what it overlaps), learning where the
    /// brk heap starts from it.
    pub fn apply_mapping(&mut self, vma: Vma) {
        if vma.class == MappingClass::Heap {
            self.heap_start = Some(vma.start);
        }
        self.insert(vma);
    }

    /// A fault the kernel handled at `addr`, in no known VMA, right below the main stack: the
    /// stack grew down to it (which no record reports). Extends the stack VMA and says so.
    pub fn grow_stack(&mut self, addr: u64) -> bool {
        let Some((&start, above)) = self.vmas.range(addr..).next() else {
            return false;
        };
        if above.class != MappingClass::Stack || above.path.as_deref() != Some("[stack]") {
            return false;
        }
        let below_end = self
            .vmas
            .range(..addr)
            .next_back()
            .map_or(0, |(_, v)| v.end);
        if below_end > addr {
            return false;
        }
        let Some(mut stack) = self.vmas.remove(&start) else {
            return false;
        };
        stack.start = addr & !4095;
        self.vmas.insert(stack.start, stack);
        true
    }

    /// Applies a successful mmap. `path` is the backing file when known.
    pub fn apply_mmap(
        &mut self,
        addr: u64,
        len: u64,
        (prot, flags): (u32, u32),
        offset: u64,
        path: Option<Arc<str>>,
    ) {
        use mmap_flags::*;
        // The low two bits are the mapping type: 1 shared, 2 private, 3 shared-validate.
        let shared = flags & MAP_SHARED != 0;
        let anonymous = flags & MAP_ANONYMOUS != 0;
        let class = if anonymous {
            if shared {
                MappingClass::AnonShared
            } else if flags & MAP_STACK != 0 {
                MappingClass::Stack
            } else {
                MappingClass::AnonPrivate
            }
        } else {
            match path.as_deref() {
                Some(p) if is_shmem_path(p) => MappingClass::AnonShared,
                _ if shared => MappingClass::FileShared,
                _ => MappingClass::FilePrivate,
            }
        };
        self.insert(Vma {
            start: addr,
            end: addr + page_align(len),
            offset: if anonymous { 0 } else { offset },
            class,
            path: if anonymous { None } else { path },
            exec: prot & PROT_EXEC != 0,
        });
    }

    pub fn apply_munmap(&mut self, addr: u64, len: u64) {
        self.remove_range(addr, addr + page_align(len));
    }

    /// Applies a successful mremap: the VMA at `old` moves (or grows in place) to `new`.
    pub fn apply_mremap(&mut self, old: u64, old_len: u64, new: u64, new_len: u64) {
        let template = self.find(old).cloned();
        self.remove_range(old, old + page_align(old_len));
        if let Some(mut vma) = template {
            vma.offset = vma.file_offset(old);
            vma.start = new;
            vma.end = new + page_align(new_len);
            self.insert(vma);
        }
    }

    /// Applies a successful brk: the heap now ends at `new_brk`.
    pub fn apply_brk(&mut self, new_brk: u64) {
        let heap_start = match self.heap_start {
            Some(s) => s,
            None => {
                // The first brk of a process returns the initial break: the heap starts there.
                self.heap_start = Some(new_brk);
                return;
            }
        };
        let end = page_align(new_brk);
        self.remove_range(heap_start, end.max(self.heap_end(heap_start)));
        if end > heap_start {
            self.insert(Vma {
                start: heap_start,
                end,
                offset: 0,
                class: MappingClass::Heap,
                path: Some(Arc::from("[heap]")),
                exec: false,
            });
        }
    }

    /// Bytes of `[start, end)` some VMA covers.
    pub fn mapped_bytes_in(&self, start: u64, end: u64) -> u64 {
        let first = self
            .vmas
            .range(..start)
            .next_back()
            .filter(|(_, v)| v.end > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.vmas
            .range(first..end)
            .map(|(_, v)| v.end.min(end).saturating_sub(v.start.max(start)))
            .sum()
    }

    /// Where the brk heap ends (page-aligned), when the model knows the heap.
    pub fn brk_end(&self) -> Option<u64> {
        let start = self.heap_start?;
        Some(self.heap_end(start)).filter(|&end| end > start)
    }

    fn heap_end(&self, heap_start: u64) -> u64 {
        self.vmas
            .get(&heap_start)
            .filter(|v| v.class == MappingClass::Heap)
            .map_or(heap_start, |v| v.end)
    }
}

fn page_align(len: u64) -> u64 {
    (len + 4095) & !4095
}

/// The path of an open file descriptor of a live process.
pub fn fd_path(pid: u32, fd: i32) -> Option<Arc<str>> {
    let link = std::fs::read_link(Path::new(&format!("/proc/{pid}/fd/{fd}"))).ok()?;
    let s = link.to_str()?;
    Some(Arc::from(s.strip_suffix(" (deleted)").unwrap_or(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 r-xp 00001000 08:01 1234 /usr/bin/demo
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 rw-s 00000000 00:05 77 /dev/shm/buf
7f0000200000-7f0000300000 r--s 00000000 08:01 99 /var/data/file.bin
7f0000300000-7f0000400000 r--p 00010000 08:01 98 /usr/lib/libc.so.6
7f0000400000-7f0000500000 rw-s 00000000 00:01 5 /dev/zero (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn parses_and_classifies_maps() {
        let space = AddressSpace::from_maps(MAPS);
        assert_eq!(space.len(), 9);
        let class = |a| space.find(a).map(|v| v.class);
        assert_eq!(class(0x55d0c0a00010), Some(MappingClass::FilePrivate));
        assert_eq!(class(0x55d0c1000000), Some(MappingClass::Heap));
        assert_eq!(class(0x7f0000000fff), Some(MappingClass::AnonPrivate));
        assert_eq!(class(0x7f0000100000), Some(MappingClass::AnonShared));
        assert_eq!(class(0x7f0000200000), Some(MappingClass::FileShared));
        assert_eq!(class(0x7f0000400000), Some(MappingClass::AnonShared));
        assert_eq!(class(0x7ffc00000000), Some(MappingClass::Stack));
        assert_eq!(class(0x7ffc00100000), Some(MappingClass::Other));
        assert_eq!(class(0x7ffc00021000), None, "end is exclusive");
        let libc = space.find(0x7f0000300010).expect("libc");
        assert!(!libc.exec, "r--p");
        assert!(space.find(0x55d0c0a00010).is_some_and(|v| v.exec), "r-xp");
        assert_eq!(libc.file_offset(0x7f0000300010), 0x10010);
        assert_eq!(libc.path.as_deref(), Some("/usr/lib/libc.so.6"));
    }

    #[test]
    fn munmap_splits_a_vma() {
        let mut space = AddressSpace::from_maps(MAPS);
        space.apply_munmap(0x7f0000310000, 0x1000);
        let head = space.find(0x7f000030f000).expect("head");
        assert_eq!((head.start, head.end), (0x7f0000300000, 0x7f0000310000));
        assert!(space.find(0x7f0000310000).is_none());
        let tail = space.find(0x7f0000311000).expect("tail");
        assert_eq!(tail.start, 0x7f0000311000);
        assert_eq!(tail.offset, 0x10000 + 0x11000, "tail keeps its file offset");
    }

    #[test]
    fn mmap_replaces_overlaps_and_classifies_by_flags() {
        use mmap_flags::*;
        let mut space = AddressSpace::from_maps(MAPS);
        space.apply_mmap(
            0x7f0000080000,
            0x100000,
            (0, MAP_SHARED | MAP_ANONYMOUS),
            0,
            None,
        );
        assert_eq!(
            space.find(0x7f0000090000).map(|v| v.class),
            Some(MappingClass::AnonShared)
        );
        // The old anon VMA was cut at the new mapping's start; the shm one lost its head.
        assert_eq!(
            space.find(0x7f0000000000).map(|v| v.end),
            Some(0x7f0000080000)
        );
        assert_eq!(
            space.find(0x7f0000180000).map(|v| v.start),
            Some(0x7f0000180000)
        );
        space.apply_mmap(0x1000_0000, 10, (0, MAP_ANONYMOUS | MAP_STACK), 0, None);
        assert_eq!(
            space.find(0x1000_0000).map(|v| (v.class, v.end)),
            Some((MappingClass::Stack, 0x1000_1000))
        );
        space.apply_mmap(
            0x2000_0000,
            0x3000,
            (PROT_EXEC, 0x02),
            0x4000,
            Some(Arc::from("/data/f")),
        );
        let f = space.find(0x2000_1000).expect("file");
        assert_eq!(
            (f.class, f.file_offset(0x2000_1000), f.exec),
            (MappingClass::FilePrivate, 0x5000, true)
        );
        space.apply_mmap(
            0x3000_0000,
            0x3000,
            (0, MAP_SHARED_VALIDATE),
            0,
            Some(Arc::from("/data/g")),
        );
        assert_eq!(
            space.find(0x3000_0000).map(|v| v.class),
            Some(MappingClass::FileShared)
        );
    }

    #[test]
    fn mremap_moves_the_mapping() {
        let mut space = AddressSpace::from_maps(MAPS);
        space.apply_mremap(0x7f0000200000, 0x100000, 0x6000_0000, 0x200000);
        assert!(space.find(0x7f0000200000).is_none());
        let moved = space.find(0x6000_0000 + 0x1f0000).expect("moved");
        assert_eq!(moved.class, MappingClass::FileShared);
        assert_eq!(moved.path.as_deref(), Some("/var/data/file.bin"));
    }

    #[test]
    fn the_main_stack_grows_down_to_a_fault_below_it() {
        let mut space = AddressSpace::from_maps(MAPS);
        assert!(space.grow_stack(0x7ffbfffff123));
        let stack = space.find(0x7ffbfffff123).expect("grown");
        assert_eq!((stack.start, stack.end), (0x7ffbfffff000, 0x7ffc00021000));
        assert_eq!(stack.class, MappingClass::Stack);
        // Not below a stack (the heap), or inside another VMA: no growth.
        assert!(!space.grow_stack(0x55d0c0fff000));
        assert!(!space.grow_stack(0x7f00000fffff + 0x100000));
    }

    #[test]
    fn counts_the_mapped_bytes_of_a_range() {
        let space = AddressSpace::from_maps(MAPS);
        // Across the anonymous VMA's end into the shm one: 0x10000 + 0x8000.
        assert_eq!(
            space.mapped_bytes_in(0x7f00000f0000, 0x7f0000108000),
            0x18000
        );
        // A hole.
        assert_eq!(space.mapped_bytes_in(0x7f0000500000, 0x7f0000600000), 0);
    }

    #[test]
    fn brk_grows_and_shrinks_the_heap() {
        let mut space = AddressSpace::from_maps(MAPS);
        space.apply_brk(0x55d0c1100000);
        assert_eq!(
            space.find(0x55d0c10fffff).map(|v| v.class),
            Some(MappingClass::Heap)
        );
        space.apply_brk(0x55d0c1010000);
        assert!(space.find(0x55d0c1020000).is_none());
        assert_eq!(
            space.find(0x55d0c100ffff).map(|v| v.class),
            Some(MappingClass::Heap)
        );

        // A process first seen without a heap learns the heap start from its first brk.
        let mut fresh = AddressSpace::default();
        fresh.apply_brk(0x5000_0000);
        fresh.apply_brk(0x5002_1000);
        assert_eq!(
            fresh.find(0x5002_0000).map(|v| v.class),
            Some(MappingClass::Heap)
        );
    }
}
