//! The system's view from `/proc/meminfo`, itemized so the parts add up to what is in use:
//! private memory is in AnonPages, shared and file memory in Cached (of which Shmem is the
//! shared anonymous part), the kernel's own in Slab, stacks, page tables, vmalloc and percpu.
use serde::Serialize;

/// /proc/meminfo's figures that explain where memory went, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Meminfo {
    pub mem_total: u64,
    pub mem_free: u64,
    pub mem_available: u64,
    pub buffers: u64,
    /// Page cache, Shmem included, Buffers and SwapCached not.
    pub cached: u64,
    pub swap_cached: u64,
    /// Private (anonymous and copy-on-write) pages mapped by processes.
    pub anon_pages: u64,
    /// Page-cache pages mapped by some process.
    pub mapped: u64,
    /// Shared anonymous memory: tmpfs, /dev/shm, SysV shm, MAP_SHARED|MAP_ANONYMOUS.
    pub shmem: u64,
    pub slab: u64,
    pub s_reclaimable: u64,
    pub s_unreclaim: u64,
    pub kernel_stack: u64,
    pub page_tables: u64,
    pub vmalloc_used: u64,
    pub percpu: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl Meminfo {
    pub fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let Some(value) = words.next().and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            let bytes = if words.next() == Some("kB") {
                value * 1024
            } else {
                value
            };
            let field = match name {
                "MemTotal" => &mut m.mem_total,
                "MemFree" => &mut m.mem_free,
                "MemAvailable" => &mut m.mem_available,
                "Buffers" => &mut m.buffers,
                "Cached" => &mut m.cached,
                "SwapCached" => &mut m.swap_cached,
                "AnonPages" => &mut m.anon_pages,
                "Mapped" => &mut m.mapped,
                "Shmem" => &mut m.shmem,
                "Slab" => &mut m.slab,
                "SReclaimable" => &mut m.s_reclaimable,
                "SUnreclaim" => &mut m.s_unreclaim,
                "KernelStack" => &mut m.kernel_stack,
                "PageTables" => &mut m.page_tables,
                "VmallocUsed" => &mut m.vmalloc_used,
                "Percpu" => &mut m.percpu,
                "SwapTotal" => &mut m.swap_total,
                "SwapFree" => &mut m.swap_free,
                _ => continue,
            };
            *field = bytes;
        }
        m
    }

    pub fn read() -> std::io::Result<Self> {
        std::fs::read_to_string("/proc/meminfo").map(|t| Self::parse(&t))
    }

    /// MemTotal less MemFree.
    pub fn used(&self) -> u64 {
        self.mem_total.saturating_sub(self.mem_free)
    }

    /// What is in use and none of the itemized figures holds: drivers' pages, huge pages
    /// reserved, the kernel image, memory ballooned away.
    pub fn not_itemized(&self) -> u64 {
        let itemized = self.anon_pages
            + self.cached
            + self.buffers
            + self.swap_cached
            + self.slab
            + self.kernel_stack
            + self.page_tables
            + self.vmalloc_used
            + self.percpu;
        self.used().saturating_sub(itemized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_itemizes() {
        let m = Meminfo::parse(
            "MemTotal:       1000 kB\nMemFree:         400 kB\nBuffers:          10 kB\n\
             Cached:          300 kB\nAnonPages:       150 kB\nShmem:            20 kB\n\
             Slab:             60 kB\nSReclaimable:     40 kB\nSUnreclaim:       20 kB\n\
             KernelStack:       5 kB\nPageTables:        5 kB\nHugePages_Total:   0\n",
        );
        assert_eq!(m.mem_total, 1000 << 10);
        assert_eq!(m.shmem, 20 << 10);
        assert_eq!(m.used(), 600 << 10);
        // 600 used, 530 itemized.
        assert_eq!(m.not_itemized(), 70 << 10);
    }
}
