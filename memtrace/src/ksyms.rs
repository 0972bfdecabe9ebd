//! Kernel addresses to `function+0xoff` through /proc/kallsyms, loaded once and kept as one
//! sorted table: a slab report resolves thousands of call sites and stack frames at a time.
use std::fmt::Write as _;

pub const KALLSYMS: &str = "/proc/kallsyms";

/// Text symbols of the kernel and its modules, sorted by address.
#[derive(Debug, Default)]
pub struct Kallsyms {
    /// (address, end of the name in `names`, with the module's name after it if any).
    symbols: Vec<(u64, u32)>,
    names: String,
}

impl Kallsyms {
    /// Reads /proc/kallsyms. Addresses all zero (kptr_restrict for this user) give an empty
    /// table: every address then prints as hex.
    pub fn load() -> Self {
        std::fs::read_to_string(KALLSYMS)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Self {
        let mut rows: Vec<(u64, &str, Option<&str>)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                let module = f.next().map(|m| m.trim_matches(|c| c == '[' || c == ']'));
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W")).then_some((addr, name, module))
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        let mut names = String::new();
        let mut symbols = Vec::with_capacity(rows.len());
        for (addr, name, module) in rows {
            names.push_str(name);
            if let Some(m) = module {
                let _ = write!(names, " [{m}]");
            }
            symbols.push((addr, names.len() as u32));
        }
        names.shrink_to_fit();
        Self { symbols, names }
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The symbol containing `addr` (the last one at or below it) and the offset into it.
    pub fn resolve(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self
            .symbols
            .partition_point(|&(a, _)| a <= addr)
            .checked_sub(1)?;
        let (start, end) = self.symbols[i];
        let begin = if i == 0 { 0 } else { self.symbols[i - 1].1 };
        Some((&self.names[begin as usize..end as usize], addr - start))
    }

    /// `function+0xoff`, with ` [module]` for a module's code; hex when nothing contains it.
    pub fn describe(&self, addr: u64) -> String {
        match self.resolve(addr) {
            Some((name, off)) => match name.split_once(' ') {
                Some((func, module)) => format!("{func}+0x{off:x} {module}"),
                None => format!("{name}+0x{off:x}"),
            },
            None => format!("0x{addr:x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ffffffff816475a0 T __kmalloc_noprof\n\
        ffffffff81647fb0 T kfree\n\
        ffffffff816e4bc0 T alloc_pipe_info\n\
        ffffffff82000000 D some_data\n\
        ffffffffc0001000 t nf_hook [nf_tables]\n\
        0000000000000000 T hidden\n";

    #[test]
    fn resolves_addresses_to_the_enclosing_function() {
        let k = Kallsyms::parse(SAMPLE);
        assert_eq!(
            k.describe(0xffffffff816e4bc0 + 0x2e),
            "alloc_pipe_info+0x2e"
        );
        assert_eq!(k.describe(0xffffffff81647fb0), "kfree+0x0");
        assert_eq!(k.describe(0xffffffffc0001010), "nf_hook+0x10 [nf_tables]");
        // Below the first symbol: no function contains it.
        assert_eq!(k.describe(0x1000), "0x1000");
        // Data symbols are not functions: a text address past kfree stays in kfree's range.
        assert_eq!(k.resolve(0xffffffff81650000).unwrap().0, "kfree");
    }

    #[test]
    fn hidden_addresses_leave_the_table_empty() {
        let k = Kallsyms::parse("0000000000000000 T kfree\n0000000000000000 T kmalloc\n");
        assert!(k.is_empty());
        assert_eq!(k.describe(0xffffffff81647fb0), "0xffffffff81647fb0");
    }
}
