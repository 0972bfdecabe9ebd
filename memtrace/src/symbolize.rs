//! Stack symbolization with blazesym.
//!
//! User frames are resolved through the agent's own model of the process's mappings (file and
//! file offset), not through `/proc/PID`, so stacks of processes that have exited still
//! symbolize. Results are cached per (file, offset) and per kernel address.
use foldhash::{HashMap, HashMapExt, HashSet};
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    symbolize::{
        source::{Elf, Kernel, Source},
        Input, Symbolized, Symbolizer as Blaze,
    },
    MaybeDefault,
};
use serde::Serialize;

use crate::stacks::{UserFrame, UserStack};

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Function name (demangled), or `[unknown]`.
    pub function: String,
    /// Offset of the address from the function's start (for `[unknown]`: from the module's start, as addr2line takes it).
    pub offset: u64,
    /// The ELF file, `[kernel]`, or the pseudo-path of an anonymous mapping.
    pub module: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// A frame inlined into the one after it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    pub address: u64,
}

impl Frame {
    /// A frame no symbol names; `offset` is the file offset in `module` (what addr2line
    /// takes), or the address itself for memory without a file.
    fn unknown(address: u64, module: &str, offset: u64) -> Self {
        Self {
            function: "[unknown]".into(),
            offset,
            module: module.into(),
            file: None,
            line: None,
            inlined: false,
            address,
        }
    }

    /// `function+0xoff (module)` for tables.
    pub fn display(&self) -> String {
        let module = self.module.rsplit('/').next().unwrap_or(&self.module);
        if self.function == "[unknown]" {
            format!("[unknown] ({module}+0x{:x})", self.offset)
        } else {
            format!("{}+0x{:x} ({module})", self.function, self.offset)
        }
    }
}

/// ELF files larger than this are symbolized from their symbol tables only, without DWARF
/// (no file:line, no inlined frames): parsing the debug info of a large debug build costs more
/// memory than a tracer left running on a busy host may take (+45 MiB for a 66 MiB binary).
pub const DWARF_MAX_FILE_BYTES: u64 = 32 << 20;

/// Symbolized (file, offset) and kernel addresses kept between reports, at most: past this,
/// what the last report did not use is dropped.
pub const MAX_CACHED: usize = 200_000;

/// One address, symbolized: its frames (more than one with inlined functions) and what each
/// means when callsites merge.
#[derive(Debug)]
struct Symbol {
    frames: Box<[Frame]>,
    ids: Box<[u32]>,
    /// The report that last used it.
    used: u32,
}

/// Symbolizes stacks for reports, keeping the agent's memory bounded on a host full of big
/// binaries: blazesym's parsed symbol tables and DWARF (and the files it maps) live only
/// while one file's addresses are symbolized, in a batch; what outlives a report is the
/// compact per-address result, and only while reports still use it.
pub struct Symbolizer {
    /// Per file: symbolize with its DWARF (small enough) or its symbol tables only.
    use_dwarf: HashMap<Arc<str>, bool>,
    user_cache: HashMap<(Arc<str>, u64), Symbol>,
    kernel_cache: HashMap<u64, Symbol>,
    /// Small ids for what a frame means when merging callsites (see [`Symbolizer::user_ids`]).
    merge_names: HashMap<Box<str>, u32>,
    /// The current report, to tell which cached results are still used.
    generation: u32,
    /// Addresses the current report needs and the caches lack, by file.
    wanted: HashMap<Arc<str>, HashSet<u64>>,
    wanted_kernel: Vec<u64>,
    /// Sequences of merge ids as a tree: (parent node, id) -> node; node 0 is the empty one.
    /// It lives for one report.
    merge_tree: HashMap<(u32, u32), u32>,
}

/// A sequence of merge ids, as one node of the symbolizer's merge tree: valid within the
/// report that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MergePath(u32);

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

fn frames_from(sym: &Symbolized<'_>, address: u64, module: &str, offset: u64) -> Vec<Frame> {
    let Symbolized::Sym(sym) = sym else {
        return vec![Frame::unknown(address, module, offset)];
    };
    // The mapped file names the module; blazesym's module is where the symbol was found, which
    // for a stripped library is its separate debug file (`<build-id>.debug`).
    let module = if module.starts_with('/') {
        module.to_string()
    } else {
        sym.module
            .as_deref()
            .map(|m| m.to_string_lossy().into_owned())
            .unwrap_or_else(|| module.to_string())
    };
    let (file, line) = match &sym.code_info {
        Some(ci) => (Some(ci.to_path().display().to_string()), ci.line),
        None => (None, None),
    };
    // blazesym lists inlined functions outermost first; a stack reads innermost first.
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inl| Frame {
            function: inl.name.to_string(),
            offset: 0,
            module: module.clone(),
            file: inl
                .code_info
                .as_ref()
                .map(|c| c.to_path().display().to_string()),
            line: inl.code_info.as_ref().and_then(|c| c.line),
            inlined: true,
            address,
        })
        .collect();
    frames.push(Frame {
        function: sym.name.to_string(),
        offset: sym.offset as u64,
        module,
        file,
        line,
        inlined: false,
        address,
    });
    frames
}

fn blazesym() -> Blaze {
    Blaze::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .build()
}

fn kernel_source() -> Source<'static> {
    Source::Kernel(Kernel {
        vmlinux: MaybeDefault::None,
        ..Kernel::default()
    })
}

/// The stand-in for a frame outside every known mapping.
fn unmapped_frame() -> Frame {
    Frame::unknown(0, "[unmapped]", 0)
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            use_dwarf: HashMap::new(),
            user_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
            merge_names: HashMap::new(),
            generation: 0,
            wanted: HashMap::new(),
            wanted_kernel: Vec::new(),
            merge_tree: HashMap::new(),
        }
    }

    fn elf_source(&mut self, path: &Arc<str>) -> Source<'static> {
        let dwarf = *self.use_dwarf.entry(path.clone()).or_insert_with(|| {
            std::fs::metadata(&**path).is_ok_and(|m| m.len() <= DWARF_MAX_FILE_BYTES)
        });
        let mut elf = Elf::new(PathBuf::from(&**path));
        elf.debug_syms = dwarf;
        Source::Elf(elf)
    }

    /// The merge id of a frame: the function (and module) for named frames, the module and
    /// offset for frames no symbol names (so two unknown functions of one module stay apart).
    fn merge_id(&mut self, f: &Frame) -> u32 {
        let name = if f.function == "[unknown]" {
            format!("{}+0x{:x}", f.module, f.offset)
        } else {
            format!("{}@{}", f.function, f.module)
        };
        let next = self.merge_names.len() as u32;
        *self
            .merge_names
            .entry(name.into_boxed_str())
            .or_insert(next)
    }

    fn symbol(&mut self, frames: Vec<Frame>) -> Symbol {
        let ids = frames.iter().map(|f| self.merge_id(f)).collect();
        Symbol {
            frames: frames.into_boxed_slice(),
            ids,
            used: self.generation,
        }
    }

    /// Starts a report: addresses [`Symbolizer::want_user`] and [`Symbolizer::want_kernel`]
    /// name from now on are symbolized together by [`Symbolizer::symbolize_wanted`], with
    /// those wanted ahead and not symbolized yet.
    pub fn begin_report(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.wanted_kernel.clear();
        // Merge paths are compared within one report only.
        self.merge_tree = HashMap::new();
    }

    /// Marks a stack's addresses for this report, keeping cached ones.
    pub fn want_user(&mut self, stack: &UserStack) {
        for frame in &stack.frames {
            if let UserFrame::File { path, offset } = frame {
                self.want_frame(path, *offset);
            }
        }
    }

    /// [`Symbolizer::want_user`] for one frame. Between reports, it marks the address to be
    /// symbolized ahead, by [`Symbolizer::symbolize_some`] or by the next report at the latest.
    pub fn want_frame(&mut self, path: &Arc<str>, offset: u64) {
        match self.user_cache.get_mut(&(path.clone(), offset)) {
            Some(sym) => sym.used = self.generation,
            None => {
                self.wanted.entry(path.clone()).or_default().insert(offset);
            }
        }
    }

    /// [`Symbolizer::want_user`] for a kernel stack.
    pub fn want_kernel(&mut self, ips: &[u64]) {
        for &ip in ips {
            match self.kernel_cache.get_mut(&ip) {
                Some(sym) => sym.used = self.generation,
                None => self.wanted_kernel.push(ip),
            }
        }
    }

    /// Symbolizes wanted addresses a file at a time until `budget` is spent (a file is not
    /// split: its symbol tables are parsed once for all its addresses).
    pub fn symbolize_some(&mut self, budget: Duration) {
        let started = Instant::now();
        while started.elapsed() < budget {
            let Some(path) = self.wanted.keys().next().cloned() else {
                break;
            };
            if let Some(offsets) = self.wanted.remove(&path) {
                self.symbolize_file(&path, offsets);
            }
        }
    }

    /// Symbolizes a file's addresses with a blazesym instance dropped right after, so at
    /// most one file's symbol tables (and DWARF) are held at once.
    fn symbolize_file(&mut self, path: &Arc<str>, offsets: HashSet<u64>) {
        let mut offsets: Vec<u64> = offsets.into_iter().collect();
        offsets.sort_unstable();
        let src = self.elf_source(path);
        let blaze = blazesym();
        let results = blaze
            .symbolize(&src, Input::FileOffset(&offsets))
            .unwrap_or_default();
        for (i, &offset) in offsets.iter().enumerate() {
            let frames = match results.get(i) {
                Some(sym) => frames_from(sym, offset, path, offset),
                None => vec![Frame::unknown(offset, path, offset)],
            };
            let sym = self.symbol(frames);
            self.user_cache.insert((path.clone(), offset), sym);
        }
    }

    /// Symbolizes what was wanted and is not cached, one file at a time.
    pub fn symbolize_wanted(&mut self) {
        for (path, offsets) in std::mem::take(&mut self.wanted) {
            self.symbolize_file(&path, offsets);
        }
        let mut ips = std::mem::take(&mut self.wanted_kernel);
        if ips.is_empty() {
            return;
        }
        ips.sort_unstable();
        ips.dedup();
        let blaze = blazesym();
        let results = blaze
            .symbolize(&kernel_source(), Input::AbsAddr(&ips))
            .unwrap_or_default();
        for (i, &ip) in ips.iter().enumerate() {
            let frames = match results.get(i) {
                Some(sym) => frames_from(sym, ip, "[kernel]", ip),
                None => vec![Frame::unknown(ip, "[kernel]", ip)],
            };
            let sym = self.symbol(frames);
            self.kernel_cache.insert(ip, sym);
        }
    }

    /// One small id for a whole sequence of merge ids: the node of that sequence in a tree
    /// of them. Callsites merge on it; sequences sharing their start share nodes, so a
    /// report over 100,000 deep stacks does not hold 100,000 id vectors.
    pub fn merge_path(&mut self, ids: &[u32]) -> MergePath {
        let mut node = 0u32;
        for &id in ids {
            let next = self.merge_tree.len() as u32 + 1;
            node = *self.merge_tree.entry((node, id)).or_insert(next);
        }
        MergePath(node)
    }

    /// Ends a report: past [`MAX_CACHED`], drops what it did not use (the run loop hands
    /// the freed heap back to the system once the report is written).
    pub fn finish(&mut self) {
        self.merge_tree = HashMap::new();
        let generation = self.generation;
        if self.user_cache.len() + self.kernel_cache.len() > MAX_CACHED {
            self.user_cache.retain(|_, s| s.used == generation);
            self.kernel_cache.retain(|_, s| s.used == generation);
            self.user_cache.shrink_to_fit();
            self.kernel_cache.shrink_to_fit();
        }
    }

    /// The cached result for a user frame, symbolizing it now if
    /// [`Symbolizer::symbolize_wanted`] did not see it.
    fn user_symbol(&mut self, path: &Arc<str>, offset: u64) -> &Symbol {
        let key = (path.clone(), offset);
        if !self.user_cache.contains_key(&key) {
            let src = self.elf_source(path);
            let frames = match blazesym().symbolize_single(&src, Input::FileOffset(offset)) {
                Ok(sym) => frames_from(&sym, offset, path, offset),
                Err(_) => vec![Frame::unknown(offset, path, offset)],
            };
            let sym = self.symbol(frames);
            self.user_cache.insert(key.clone(), sym);
        }
        &self.user_cache[&key]
    }

    fn kernel_symbol(&mut self, ip: u64) -> &Symbol {
        if !self.kernel_cache.contains_key(&ip) {
            let frames = match blazesym().symbolize_single(&kernel_source(), Input::AbsAddr(ip)) {
                Ok(sym) => frames_from(&sym, ip, "[kernel]", ip),
                Err(_) => vec![Frame::unknown(ip, "[kernel]", ip)],
            };
            let sym = self.symbol(frames);
            self.kernel_cache.insert(ip, sym);
        }
        &self.kernel_cache[&ip]
    }

    /// Symbolizes a resolved user stack (innermost first).
    pub fn user_frames(&mut self, stack: &UserStack) -> Vec<Frame> {
        let mut out = Vec::with_capacity(stack.frames.len());
        for frame in &stack.frames {
            match frame {
                UserFrame::File { path, offset } => {
                    out.extend(self.user_symbol(path, *offset).frames.iter().cloned())
                }
                UserFrame::Anon { name, offset } => {
                    out.push(Frame::unknown(*offset, name, *offset))
                }
                UserFrame::Unmapped => out.push(unmapped_frame()),
            }
        }
        out
    }

    /// What a user stack's frames mean when callsites merge, as small ids appended to `out`:
    /// the function (and module) for named frames, the module and offset for frames no
    /// symbol names. No frame is built: this runs for every callsite of every report.
    pub fn user_ids(&mut self, stack: &UserStack, out: &mut Vec<u32>) {
        for frame in &stack.frames {
            match frame {
                UserFrame::File { path, offset } => {
                    out.extend_from_slice(&self.user_symbol(path, *offset).ids)
                }
                UserFrame::Anon { name, offset } => {
                    let id = self.merge_id(&Frame::unknown(*offset, name, *offset));
                    out.push(id);
                }
                UserFrame::Unmapped => {
                    let id = self.merge_id(&unmapped_frame());
                    out.push(id);
                }
            }
        }
    }

    /// Symbolizes a kernel stack (innermost first) with /proc/kallsyms.
    pub fn kernel_stack(&mut self, ips: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            out.extend(self.kernel_symbol(ip).frames.iter().cloned());
        }
        out
    }

    /// [`Symbolizer::user_ids`] for a kernel stack.
    pub fn kernel_ids(&mut self, ips: &[u64], out: &mut Vec<u32>) {
        for &ip in ips {
            out.extend_from_slice(&self.kernel_symbol(ip).ids);
        }
    }

    /// Cache sizes, for finding where the agent's memory goes.
    pub fn footprint(&self) -> String {
        let frames: usize = self.user_cache.values().map(|v| v.frames.len()).sum();
        format!(
            "user_cache {} ({} frames) kernel_cache {} merge_names {}",
            self.user_cache.len(),
            frames,
            self.kernel_cache.len(),
            self.merge_names.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolizer_test() -> u64 {
        marker_function_for_symbolizer_test as *const () as u64
    }

    #[test]
    fn symbolizes_own_function_through_the_maps_model_and_caches_it() {
        let addr = std::hint::black_box(marker_function_for_symbolizer_test());
        let space = crate::addrspace::AddressSpace::read(std::process::id()).expect("own maps");
        let mut s = Symbolizer::new();
        // As a return address: looked up at the byte before, the call instruction.
        let stack = UserStack::resolve(&space, &[addr, addr + 2]);
        let frames = s.user_frames(&stack);
        let last = frames.last().expect("a frame");
        assert!(
            last.function
                .contains("marker_function_for_symbolizer_test"),
            "{frames:?}"
        );
        assert_eq!(last.offset, 1);
        assert_eq!(s.user_cache.len(), 2);
        // The second lookup is served from the cache.
        let again = s.user_frames(&stack);
        assert_eq!(again, frames);
        let unknown = s.user_frames(&UserStack::resolve(&Default::default(), &[addr]));
        assert_eq!(unknown[0].module, "[unmapped]");
        assert_eq!(unknown[0].display(), "[unknown] ([unmapped]+0x0)");
    }
}
