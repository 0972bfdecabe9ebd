//! Parsing `/proc/PID/smaps` and `smaps_rollup`: each VMA's figures, summed by the kind of
//! memory the VMA is (the same classes as `memtrace faults`).
use serde::Serialize;

use crate::addrspace::{parse_maps_line, MappingClass};

/// The figures of one smaps block (a VMA, or the rollup), in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    /// Mapped (virtual) size; the rollup has none.
    pub size: u64,
    pub rss: u64,
    pub pss: u64,
    /// Private_Clean + Private_Dirty: what the process alone holds (its USS).
    pub uss: u64,
    pub swap: u64,
    pub swap_pss: u64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.size += o.size;
        self.rss += o.rss;
        self.pss += o.pss;
        self.uss += o.uss;
        self.swap += o.swap;
        self.swap_pss += o.swap_pss;
    }

    /// Takes one `Name:   value kB` line; false if it is not a field line.
    fn field(&mut self, line: &str) -> bool {
        let Some((name, rest)) = line.split_once(':') else {
            return false;
        };
        if name.contains(' ') {
            return false;
        }
        let kb = || -> u64 {
            rest.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        match name {
            "Size" => self.size += kb(),
            "Rss" => self.rss += kb(),
            "Pss" => self.pss += kb(),
            "Private_Clean" | "Private_Dirty" => self.uss += kb(),
            "Swap" => self.swap += kb(),
            "SwapPss" => self.swap_pss += kb(),
            _ => {}
        }
        true
    }
}

/// A process's memory by kind, from its smaps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Kinds {
    pub anon_private: Figures,
    pub anon_shared: Figures,
    pub file_private: Figures,
    pub file_shared: Figures,
    pub heap: Figures,
    pub stack: Figures,
    /// vdso, vvar, vsyscall and named anonymous regions.
    pub other: Figures,
}

impl Kinds {
    pub fn get_mut(&mut self, class: MappingClass) -> &mut Figures {
        match class {
            MappingClass::AnonPrivate => &mut self.anon_private,
            MappingClass::AnonShared => &mut self.anon_shared,
            MappingClass::FilePrivate => &mut self.file_private,
            MappingClass::FileShared => &mut self.file_shared,
            MappingClass::Heap => &mut self.heap,
            MappingClass::Stack => &mut self.stack,
            MappingClass::Other => &mut self.other,
        }
    }

    /// Each kind with its name, in report order.
    pub fn iter(&self) -> [(MappingClass, &Figures); 7] {
        [
            (MappingClass::AnonPrivate, &self.anon_private),
            (MappingClass::Heap, &self.heap),
            (MappingClass::Stack, &self.stack),
            (MappingClass::AnonShared, &self.anon_shared),
            (MappingClass::FilePrivate, &self.file_private),
            (MappingClass::FileShared, &self.file_shared),
            (MappingClass::Other, &self.other),
        ]
    }

    pub fn total(&self) -> Figures {
        let mut t = Figures::default();
        for (_, f) in self.iter() {
            t.add(f);
        }
        t
    }
}

/// Sums `/proc/PID/smaps` by kind of memory.
pub fn parse_smaps(text: &str) -> Kinds {
    let mut kinds = Kinds::default();
    let mut current: Option<MappingClass> = None;
    let mut block = Figures::default();
    for line in text.lines() {
        if block.field(line) {
            continue;
        }
        if let Some(vma) = parse_maps_line(line) {
            if let Some(class) = current.take() {
                kinds.get_mut(class).add(&block);
            }
            block = Figures::default();
            current = Some(vma.class);
        }
    }
    if let Some(class) = current {
        kinds.get_mut(class).add(&block);
    }
    kinds
}

/// `/proc/PID/smaps_rollup`: the kernel's own totals. `None` when it holds no rollup (a
/// kernel thread's, or a process's that has just exited, is empty).
pub fn parse_rollup(text: &str) -> Option<Figures> {
    let mut figures = Figures::default();
    let mut fields = 0;
    for line in text.lines() {
        if figures.field(line) {
            fields += 1;
        }
    }
    (fields > 0).then_some(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
559ec7fcd000-559ec7fcf000 r--p 00000000 fe:00 247282                     /usr/bin/head
Size:                  8 kB
Rss:                   8 kB
Pss:                   8 kB
Private_Clean:         8 kB
Private_Dirty:         0 kB
Swap:                  0 kB
VmFlags: rd mr mw me
559ec8000000-559ec8021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
Pss:                 100 kB
Private_Clean:         0 kB
Private_Dirty:       100 kB
Swap:                 12 kB
SwapPss:              12 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000100000 rw-s 00000000 00:01 1234                       /dev/shm/buf
Size:               1024 kB
Rss:                1024 kB
Pss:                 512 kB
Shared_Dirty:       1024 kB
Private_Dirty:         0 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 400 kB
Pss:                 400 kB
Private_Dirty:       400 kB
7f0000200000-7f0000300000 r--s 00000000 fe:00 99                         /var/lib/data file
Size:               1024 kB
Rss:                 256 kB
Pss:                 128 kB
Shared_Clean:        256 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
Pss:                  16 kB
Private_Dirty:        16 kB
";

    #[test]
    fn sums_smaps_by_kind() {
        let k = parse_smaps(SMAPS);
        assert_eq!(k.file_private.rss, 8 << 10);
        assert_eq!(k.file_private.uss, 8 << 10);
        assert_eq!(k.heap.rss, 100 << 10);
        assert_eq!(k.heap.swap, 12 << 10);
        assert_eq!(k.anon_shared.pss, 512 << 10);
        assert_eq!(k.anon_shared.uss, 0);
        assert_eq!(k.anon_private.size, 1024 << 10);
        assert_eq!(k.anon_private.rss, 400 << 10);
        // A path with a space in it still classifies as a shared file.
        assert_eq!(k.file_shared.pss, 128 << 10);
        assert_eq!(k.stack.rss, 16 << 10);
        let t = k.total();
        assert_eq!(t.rss, (8 + 100 + 1024 + 400 + 256 + 16) << 10);
        assert_eq!(t.uss, (8 + 100 + 400 + 16) << 10);
    }

    #[test]
    fn reads_the_rollup_and_knows_an_empty_one() {
        let rollup = "5588428f3000-7ffc0135d000 ---p 00000000 00:00 0   [rollup]\n\
                      Rss:                1732 kB\nPss:                 858 kB\n\
                      Private_Clean:       244 kB\nPrivate_Dirty:       112 kB\n\
                      Swap:                  4 kB\nSwapPss:               2 kB\n";
        let f = parse_rollup(rollup).unwrap();
        assert_eq!(
            (f.rss, f.pss, f.uss, f.swap, f.swap_pss),
            (1732 << 10, 858 << 10, 356 << 10, 4 << 10, 2 << 10)
        );
        assert_eq!(parse_rollup(""), None);
    }
}
