//! Naming slab caches and reading the kernel's own view of them: `/proc/slabinfo` (active
//! objects per cache, for the reconciliation in every report) and `/sys/kernel/slab` (which
//! names were merged into one cache: UNIX sockets live in `signal_cache` on 6.18).
use std::{collections::HashMap, path::Path};

use memtrace_common::{GFP_ACCOUNT, GFP_DMA, GFP_RECLAIMABLE};

pub const SLABINFO: &str = "/proc/slabinfo";
pub const SYS_SLAB: &str = "/sys/kernel/slab";

/// The largest kmalloc served from a slab cache (`KMALLOC_MAX_CACHE_SIZE`, two pages): larger
/// ones come straight from the page allocator and appear in no slab cache.
pub const KMALLOC_MAX_CACHE_SIZE: u64 = 8192;

/// The kmalloc cache a kmalloc size class id ([`memtrace_common::kmalloc_cache_id`]) stands
/// for, the way `kmalloc_type()` picks it: DMA first, then reclaimable, then memcg-accounted.
pub fn kmalloc_cache_name(cache_id: u64) -> String {
    let bytes = cache_id & 0xffff_ffff;
    let gfp = cache_id >> 32;
    if bytes > KMALLOC_MAX_CACHE_SIZE {
        return "kmalloc-large".into();
    }
    let size = match bytes {
        b if b >= 1024 && b % 1024 == 0 => format!("{}k", b / 1024),
        b => b.to_string(),
    };
    let family = if gfp & GFP_DMA != 0 {
        "dma-kmalloc-"
    } else if gfp & GFP_RECLAIMABLE != 0 {
        "kmalloc-rcl-"
    } else if gfp & GFP_ACCOUNT != 0 {
        "kmalloc-cg-"
    } else {
        "kmalloc-"
    };
    format!("{family}{size}")
}

/// One row of /proc/slabinfo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabinfoRow {
    pub active_objs: u64,
    pub num_objs: u64,
    pub objsize: u64,
}

/// Parses /proc/slabinfo (version 2.1): `name active_objs num_objs objsize ...` per cache.
pub fn parse_slabinfo(text: &str) -> HashMap<String, SlabinfoRow> {
    slabinfo_rows(text)
        .map(|(name, row)| (name.to_string(), row))
        .collect()
}

/// The rows of /proc/slabinfo text, borrowing the names.
pub fn slabinfo_rows(text: &str) -> impl Iterator<Item = (&str, SlabinfoRow)> {
    text.lines()
        .filter(|l| !l.starts_with("slabinfo") && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            let mut num = || f.next()?.parse::<u64>().ok();
            let row = SlabinfoRow {
                active_objs: num()?,
                num_objs: num()?,
                objsize: num()?,
            };
            Some((name, row))
        })
}

/// /proc/slabinfo now; empty (with the reason) when it cannot be read.
pub fn read_slabinfo() -> Result<HashMap<String, SlabinfoRow>, String> {
    std::fs::read_to_string(SLABINFO)
        .map(|t| parse_slabinfo(&t))
        .map_err(|e| format!("{SLABINFO}: {e}"))
}

/// Merged caches: every name under /sys/kernel/slab with the cache it is (an alias is a
/// symlink to a `:flags-size` directory shared by every name merged into it).
#[derive(Debug, Default)]
pub struct AliasGroups {
    /// Name -> the directory it resolves to.
    target: HashMap<String, String>,
    /// Directory -> the names that resolve to it, sorted.
    names: HashMap<String, Vec<String>>,
}

impl AliasGroups {
    pub fn read() -> Self {
        Self::read_from(Path::new(SYS_SLAB))
    }

    pub fn read_from(dir: &Path) -> Self {
        let mut pairs = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let target = match std::fs::read_link(e.path()) {
                    Ok(t) => t
                        .file_name()
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_else(|| name.clone()),
                    Err(_) => name.clone(),
                };
                pairs.push((name, target));
            }
        }
        Self::from_pairs(pairs)
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut groups = Self::default();
        for (name, target) in pairs {
            groups
                .names
                .entry(target.clone())
                .or_default()
                .push(name.clone());
            groups.target.insert(name, target);
        }
        for names in groups.names.values_mut() {
            names.sort();
        }
        groups
    }

    /// The other names merged into the same cache as `name` (not the `:flags-size` ones).
    pub fn aliases_of(&self, name: &str) -> Vec<String> {
        let Some(target) = self.target.get(name) else {
            return Vec::new();
        };
        self.names
            .get(target)
            .map(|names| {
                names
                    .iter()
                    .filter(|n| n.as_str() != name && !n.starts_with(':'))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Does any cache go by `name`?
    pub fn knows(&self, name: &str) -> bool {
        self.target.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmalloc_classes_are_named_as_the_kernel_names_them() {
        use memtrace_common::kmalloc_cache_id as id;
        const GFP_KERNEL: u64 = 0xcc0;
        assert_eq!(kmalloc_cache_name(id(192, GFP_KERNEL)), "kmalloc-192");
        assert_eq!(
            kmalloc_cache_name(id(192, GFP_KERNEL | GFP_ACCOUNT)),
            "kmalloc-cg-192"
        );
        assert_eq!(
            kmalloc_cache_name(id(1024, GFP_KERNEL | GFP_ACCOUNT)),
            "kmalloc-cg-1k"
        );
        assert_eq!(
            kmalloc_cache_name(id(8192, GFP_RECLAIMABLE)),
            "kmalloc-rcl-8k"
        );
        // DMA wins over accounting, reclaimable over accounting.
        assert_eq!(
            kmalloc_cache_name(id(64, GFP_DMA | GFP_ACCOUNT)),
            "dma-kmalloc-64"
        );
        assert_eq!(
            kmalloc_cache_name(id(96, GFP_RECLAIMABLE | GFP_ACCOUNT)),
            "kmalloc-rcl-96"
        );
        assert_eq!(kmalloc_cache_name(id(16384, GFP_KERNEL)), "kmalloc-large");
    }

    #[test]
    fn parses_slabinfo_rows() {
        let text = "slabinfo - version: 2.1\n\
            # name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n\
            signal_cache         150    168   1152   28    8 : tunables    0    0    0 : slabdata      6      6      0\n\
            kmalloc-cg-192       441    441    192   21    1 : tunables    0    0    0 : slabdata     21     21      0\n";
        let rows = parse_slabinfo(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows["signal_cache"],
            SlabinfoRow {
                active_objs: 150,
                num_objs: 168,
                objsize: 1152
            }
        );
        assert_eq!(rows["kmalloc-cg-192"].active_objs, 441);
    }

    #[test]
    fn alias_groups_name_the_merged_caches() {
        let groups = AliasGroups::from_pairs(
            [
                ("signal_cache", ":A-0001152"),
                ("UNIX", ":A-0001152"),
                ("UNIX-STREAM", ":A-0001152"),
                (":A-0001152", ":A-0001152"),
                ("filp", "filp"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string())),
        );
        assert_eq!(groups.aliases_of("signal_cache"), ["UNIX", "UNIX-STREAM"]);
        assert_eq!(groups.aliases_of("UNIX"), ["UNIX-STREAM", "signal_cache"]);
        assert!(groups.aliases_of("filp").is_empty());
        assert!(groups.aliases_of("nonexistent").is_empty());
        assert!(groups.knows("UNIX") && !groups.knows("nope"));
    }
}
