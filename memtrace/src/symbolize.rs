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

/// Strings of symbolized frames (function names, modules, source files), each held once: a
/// busy host's cache names the same few thousand functions and files over and over.
#[derive(Debug, Default)]
struct Strings {
    ids: HashMap<Arc<str>, u32>,
    all: Vec<Arc<str>>,
}

impl Strings {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.all.len() as u32;
        let s: Arc<str> = Arc::from(s);
        self.all.push(s.clone());
        self.ids.insert(s, id);
        id
    }

    fn get(&self, id: u32) -> &str {
        self.all.get(id as usize).map_or("", |s| s)
    }
}

/// What a frame means when callsites merge: the function (and module) for named frames, the
/// module and offset for frames no symbol names (so two unknown functions of one module stay
/// apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum MergeName {
    Function { function: u32, module: u32 },
    Unknown { module: u32, offset: u64 },
}

impl MergeName {
    /// The name of a frame of `module` at `offset`, named `function` or by no symbol.
    fn of(function: Option<u32>, module: u32, offset: u64) -> Self {
        match function {
            Some(function) => Self::Function { function, module },
            None => Self::Unknown { module, offset },
        }
    }
}

/// No source file.
const NO_FILE: u32 = u32::MAX;

/// A symbolized frame as the cache keeps it: strings by id, 32 bytes.
#[derive(Clone, Copy, Debug)]
struct CachedFrame {
    offset: u64,
    /// The function's name; `None` for a frame no symbol names.
    function: Option<u32>,
    module: u32,
    file: u32,
    /// 0 where unknown.
    line: u32,
    /// The merge id (see [`Symbolizer::merge_id`]).
    merge: u32,
    inlined: bool,
}

/// One address, symbolized: its frames (more than one with inlined functions).
#[derive(Debug)]
struct Symbol {
    frames: Box<[CachedFrame]>,
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
    strings: Strings,
    /// Small ids for what a frame means when merging callsites (see [`Symbolizer::user_ids`]).
    merge_names: HashMap<MergeName, u32>,
    /// The current report, to tell which cached results are still used.
    generation: u32,
    /// Addresses the current report needs and the caches lack, by file, with the faults of
    /// the callsites that need them.
    wanted: HashMap<Arc<str>, (HashSet<u64>, u64)>,
    wanted_kernel: Vec<u64>,
    /// Sequences of merge ids as a tree: (parent node, id) -> node; node 0 is the empty one.
    /// It lives for one report.
    merge_tree: HashMap<(u32, u32), u32>,
    /// What the last report symbolized itself (files, addresses, time): the work symbolizing
    /// ahead did not take off it.
    last_report_work: (usize, usize, Duration),
    /// See [`Symbolizer::shown_unsymbolized`].
    shown_unsymbolized: u64,
}

/// A sequence of merge ids, as one node of the symbolizer's merge tree: valid within the
/// report that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MergePath(u32);

impl MergePath {
    /// The empty sequence.
    pub const EMPTY: MergePath = MergePath(0);

    /// Its node in the merge tree (for callers that keep paths in plain tables).
    pub fn node(self) -> u32 {
        self.0
    }

    pub fn from_node(node: u32) -> Self {
        Self(node)
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
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
            strings: Strings::default(),
            merge_names: HashMap::new(),
            generation: 0,
            wanted: HashMap::new(),
            wanted_kernel: Vec::new(),
            merge_tree: HashMap::new(),
            last_report_work: (0, 0, Duration::ZERO),
            shown_unsymbolized: 0,
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

    /// The merge id of a frame no symbol names.
    fn unknown_merge_id(&mut self, module: &str, offset: u64) -> u32 {
        let module = self.strings.id(module);
        self.merge_id(MergeName::Unknown { module, offset })
    }

    fn merge_id(&mut self, name: MergeName) -> u32 {
        let next = self.merge_names.len() as u32;
        *self.merge_names.entry(name).or_insert(next)
    }

    /// A frame for the cache; `function` `None` for a frame no symbol names.
    fn cached_frame(
        &mut self,
        function: Option<&str>,
        offset: u64,
        module: &str,
        code: Option<(String, Option<u32>)>,
        inlined: bool,
    ) -> CachedFrame {
        let module = self.strings.id(module);
        let function = function.map(|f| self.strings.id(f));
        let merge = self.merge_id(MergeName::of(function, module, offset));
        let (file, line) = match code {
            Some((file, line)) => (self.strings.id(&file), line.unwrap_or(0)),
            None => (NO_FILE, 0),
        };
        CachedFrame {
            offset,
            function,
            module,
            file,
            line,
            merge,
            inlined,
        }
    }

    /// The cache entry for what blazesym made of an address; `offset` is the file offset
    /// (user frames) or the address (kernel frames) of `module`.
    fn symbol(&mut self, sym: Option<&Symbolized<'_>>, module: &str, offset: u64) -> Symbol {
        let Some(Symbolized::Sym(sym)) = sym else {
            let frame = self.cached_frame(None, offset, module, None, false);
            return Symbol {
                frames: Box::new([frame]),
                used: self.generation,
            };
        };
        // The mapped file names the module; blazesym's module is where the symbol was found,
        // which for a stripped library is its separate debug file (`<build-id>.debug`).
        let blaze_module;
        let module = match &sym.module {
            Some(m) if !module.starts_with('/') => {
                blaze_module = m.to_string_lossy();
                &*blaze_module
            }
            _ => module,
        };
        // blazesym lists inlined functions outermost first; a stack reads innermost first.
        let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
        for inl in sym.inlined.iter().rev() {
            let code = inl
                .code_info
                .as_ref()
                .map(|c| (c.to_path().display().to_string(), c.line));
            frames.push(self.cached_frame(Some(&inl.name), 0, module, code, true));
        }
        let code = sym
            .code_info
            .as_ref()
            .map(|c| (c.to_path().display().to_string(), c.line));
        frames.push(self.cached_frame(Some(&sym.name), sym.offset as u64, module, code, false));
        Symbol {
            frames: frames.into_boxed_slice(),
            used: self.generation,
        }
    }

    /// A cached frame for a report.
    fn frame(&self, f: &CachedFrame, address: u64) -> Frame {
        Frame {
            function: f
                .function
                .map_or("[unknown]", |id| self.strings.get(id))
                .to_string(),
            offset: f.offset,
            module: self.strings.get(f.module).to_string(),
            file: (f.file != NO_FILE).then(|| self.strings.get(f.file).to_string()),
            line: (f.line != 0).then_some(f.line),
            inlined: f.inlined,
            address,
        }
    }

    /// Starts a report: addresses [`Symbolizer::want_user`] and [`Symbolizer::want_kernel`]
    /// name from now on are symbolized together by [`Symbolizer::symbolize_wanted`], with
    /// those wanted ahead and not symbolized yet.
    pub fn begin_report(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.wanted_kernel.clear();
        self.shown_unsymbolized = 0;
        // Merge paths are compared within one report only.
        self.merge_tree = HashMap::new();
    }

    /// Marks a stack's addresses for this report, keeping cached ones; `faults` (of the
    /// callsite) weighs the files that are not, so a report short of time symbolizes the
    /// files behind most faults first.
    pub fn want_user(&mut self, stack: &UserStack, faults: u64) {
        for frame in &stack.frames {
            if let UserFrame::File { path, offset } = frame {
                self.want_frame(path, *offset, faults);
            }
        }
    }

    /// [`Symbolizer::want_user`] for one frame. Between reports, it marks the address to be
    /// symbolized ahead, by [`Symbolizer::symbolize_some`] or by the next report at the latest.
    pub fn want_frame(&mut self, path: &Arc<str>, offset: u64, faults: u64) {
        match self.user_cache.get_mut(&(path.clone(), offset)) {
            Some(sym) => sym.used = self.generation,
            None => {
                let (offsets, weight) = self.wanted.entry(path.clone()).or_default();
                offsets.insert(offset);
                *weight = weight.saturating_add(faults);
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
            if let Some((offsets, _)) = self.wanted.remove(&path) {
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
            let sym = self.symbol(results.get(i), path, offset);
            self.user_cache.insert((path.clone(), offset), sym);
        }
    }

    /// Symbolizes what was wanted and is not cached, one file at a time, the files behind
    /// most faults first (then those with most addresses), until `deadline`: files left wait
    /// for the next round ahead or report, and their frames show as module and offset
    /// meanwhile (see [`Symbolizer::shown_unsymbolized`]). Kernel addresses are always
    /// symbolized (kallsyms is one quick read).
    pub fn symbolize_wanted(&mut self, deadline: Option<Instant>) {
        let started = Instant::now();
        let mut files: Vec<(Arc<str>, u64, usize)> = self
            .wanted
            .iter()
            .map(|(path, (offsets, faults))| (path.clone(), *faults, offsets.len()))
            .collect();
        files.sort_unstable_by(|a, b| (b.1, b.2).cmp(&(a.1, a.2)).then_with(|| a.0.cmp(&b.0)));
        let (mut done_files, mut done_addresses) = (0, 0);
        for (path, _, n) in files {
            // The first file is always done: a report that symbolized nothing helps no one.
            if done_files > 0 && deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if let Some((offsets, _)) = self.wanted.remove(&path) {
                self.symbolize_file(&path, offsets);
                done_files += 1;
                done_addresses += n;
            }
        }
        let mut ips = std::mem::take(&mut self.wanted_kernel);
        ips.sort_unstable();
        ips.dedup();
        done_addresses += ips.len();
        if !ips.is_empty() {
            let blaze = blazesym();
            let results = blaze
                .symbolize(&kernel_source(), Input::AbsAddr(&ips))
                .unwrap_or_default();
            for (i, &ip) in ips.iter().enumerate() {
                let sym = self.symbol(results.get(i), "[kernel]", ip);
                self.kernel_cache.insert(ip, sym);
            }
        }
        self.last_report_work = (done_files, done_addresses, started.elapsed());
    }

    /// Addresses wanted and not symbolized yet (the deadline came before their file).
    #[cfg(test)]
    fn unsymbolized(&self) -> usize {
        self.wanted.values().map(|(offsets, _)| offsets.len()).sum()
    }

    /// Frames this report built as module and offset because their file was left for lack
    /// of time.
    pub fn shown_unsymbolized(&self) -> u64 {
        self.shown_unsymbolized
    }

    /// One small id for a whole sequence of merge ids, `from`'s sequence followed by `ids`:
    /// the node of that sequence in a tree of them. Callsites merge on it; sequences sharing
    /// their start share nodes, so a report over 100,000 deep stacks does not hold 100,000 id
    /// vectors.
    pub fn merge_extend(&mut self, from: MergePath, ids: &[u32]) -> MergePath {
        let mut node = from.0;
        for &id in ids {
            let next = self.merge_tree.len() as u32 + 1;
            node = *self.merge_tree.entry((node, id)).or_insert(next);
        }
        MergePath(node)
    }

    /// Ends a report: past [`MAX_CACHED`], drops what it did not use, and the strings and
    /// merge names only it held (the run loop hands the freed heap back to the system once
    /// the report is written).
    pub fn finish(&mut self) {
        self.merge_tree = HashMap::new();
        if self.user_cache.len() + self.kernel_cache.len() > MAX_CACHED {
            self.prune();
        }
    }

    /// Drops the cached results the current report did not use, and the strings and merge
    /// names only they held.
    fn prune(&mut self) {
        let generation = self.generation;
        self.user_cache.retain(|_, s| s.used == generation);
        self.kernel_cache.retain(|_, s| s.used == generation);
        self.user_cache.shrink_to_fit();
        self.kernel_cache.shrink_to_fit();
        let old = std::mem::take(&mut self.strings);
        self.merge_names = HashMap::new();
        let symbols = self
            .user_cache
            .values_mut()
            .chain(self.kernel_cache.values_mut());
        for sym in symbols {
            for f in sym.frames.iter_mut() {
                let strings = &mut self.strings;
                f.module = strings.id(old.get(f.module));
                f.function = f.function.map(|id| strings.id(old.get(id)));
                if f.file != NO_FILE {
                    f.file = strings.id(old.get(f.file));
                }
                let name = MergeName::of(f.function, f.module, f.offset);
                let next = self.merge_names.len() as u32;
                f.merge = *self.merge_names.entry(name).or_insert(next);
            }
        }
    }

    /// Symbolizes a user frame now if nothing wanted it before (a frame wanted and left by
    /// [`Symbolizer::symbolize_wanted`] for lack of time stays unsymbolized).
    fn ensure_user(&mut self, path: &Arc<str>, offset: u64) -> (Arc<str>, u64) {
        let key = (path.clone(), offset);
        let pending = || self.wanted.get(path).is_some_and(|w| w.0.contains(&offset));
        if !self.user_cache.contains_key(&key) && !pending() {
            let src = self.elf_source(path);
            let blaze = blazesym();
            let found = blaze.symbolize_single(&src, Input::FileOffset(offset));
            let sym = self.symbol(found.as_ref().ok(), path, offset);
            self.user_cache.insert(key.clone(), sym);
        }
        key
    }

    /// [`Symbolizer::ensure_user`] for a kernel address.
    fn ensure_kernel(&mut self, ip: u64) {
        if !self.kernel_cache.contains_key(&ip) {
            let blaze = blazesym();
            let found = blaze.symbolize_single(&kernel_source(), Input::AbsAddr(ip));
            let sym = self.symbol(found.as_ref().ok(), "[kernel]", ip);
            self.kernel_cache.insert(ip, sym);
        }
    }

    /// Symbolizes a resolved user stack (innermost first).
    pub fn user_frames(&mut self, stack: &UserStack) -> Vec<Frame> {
        let mut out = Vec::with_capacity(stack.frames.len());
        for frame in &stack.frames {
            match frame {
                UserFrame::File { path, offset } => {
                    let key = self.ensure_user(path, *offset);
                    match self.user_cache.get(&key) {
                        Some(sym) => out.extend(sym.frames.iter().map(|f| self.frame(f, *offset))),
                        None => {
                            self.shown_unsymbolized += 1;
                            out.push(Frame::unknown(*offset, path, *offset));
                        }
                    }
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
            self.frame_ids(frame, out);
        }
    }

    /// [`Symbolizer::user_ids`] for one frame (more than one id with inlined functions,
    /// innermost first).
    pub fn frame_ids(&mut self, frame: &UserFrame, out: &mut Vec<u32>) {
        match frame {
            UserFrame::File { path, offset } => {
                let key = self.ensure_user(path, *offset);
                match self.user_cache.get(&key) {
                    Some(sym) => out.extend(sym.frames.iter().map(|f| f.merge)),
                    None => {
                        let id = self.unknown_merge_id(path, *offset);
                        out.push(id);
                    }
                }
            }
            UserFrame::Anon { name, offset } => {
                let id = self.unknown_merge_id(name, *offset);
                out.push(id);
            }
            UserFrame::Unmapped => {
                let id = self.unknown_merge_id("[unmapped]", 0);
                out.push(id);
            }
        }
    }

    /// Symbolizes a kernel stack (innermost first) with /proc/kallsyms.
    pub fn kernel_stack(&mut self, ips: &[u64]) -> Vec<Frame> {
        let ips = self.past_fault_entry(ips);
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            self.ensure_kernel(ip);
            let frames = self.kernel_cache.get(&ip).map_or(&[][..], |s| &s.frames);
            out.extend(frames.iter().map(|f| self.frame(f, ip)));
        }
        out
    }

    /// A kernel stack taken at the fault's entry tracepoint starts in the tracing code and the
    /// exception entry (the program, `bpf_trace_run3`, `exc_page_fault`,
    /// `asm_exc_page_fault`): the frames from the faulting function on.
    fn past_fault_entry<'a>(&mut self, ips: &'a [u64]) -> &'a [u64] {
        const ENTRY_FRAMES: usize = 8;
        for (i, &ip) in ips.iter().enumerate().take(ENTRY_FRAMES) {
            self.ensure_kernel(ip);
            let is_entry = self.kernel_cache.get(&ip).is_some_and(|sym| {
                sym.frames.iter().any(|f| {
                    f.function
                        .is_some_and(|id| self.strings.get(id) == "asm_exc_page_fault")
                })
            });
            if is_entry {
                return &ips[i + 1..];
            }
        }
        ips
    }

    /// [`Symbolizer::user_ids`] for a kernel stack.
    pub fn kernel_ids(&mut self, ips: &[u64], out: &mut Vec<u32>) {
        let ips = self.past_fault_entry(ips);
        for &ip in ips {
            self.ensure_kernel(ip);
            if let Some(sym) = self.kernel_cache.get(&ip) {
                out.extend(sym.frames.iter().map(|f| f.merge));
            }
        }
    }

    /// Cache sizes, for finding where the agent's memory goes.
    pub fn footprint(&self) -> String {
        let frames: usize = self.user_cache.values().map(|v| v.frames.len()).sum();
        let (files, addresses, took) = self.last_report_work;
        format!(
            "user_cache {} ({} frames) kernel_cache {} merge_names {} strings {} | report \
             symbolized {addresses} addresses of {files} files in {} ms",
            self.user_cache.len(),
            frames,
            self.kernel_cache.len(),
            self.merge_names.len(),
            self.strings.all.len(),
            took.as_millis()
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
        // A report that no longer uses it drops it, and what it named.
        let other = UserStack::resolve(&space, &[addr, addr + 3]);
        s.begin_report();
        s.want_user(&other, 1);
        s.symbolize_wanted(None);
        let mut ids_before = Vec::new();
        s.user_ids(&other, &mut ids_before);
        let strings_before = s.strings.all.len();
        s.prune();
        assert_eq!(
            s.user_cache.len(),
            2,
            "the frame only the last report used is gone"
        );
        assert!(s.strings.all.len() <= strings_before);
        assert_eq!(s.user_frames(&other)[..1], frames[..1]);
        let mut ids_after = Vec::new();
        s.user_ids(&other, &mut ids_after);
        assert_eq!(ids_after.len(), ids_before.len());
        assert_eq!(ids_after[0] == ids_after[1], ids_before[0] == ids_before[1]);
        let unknown = s.user_frames(&UserStack::resolve(&Default::default(), &[addr]));
        assert_eq!(unknown[0].module, "[unmapped]");
        assert_eq!(unknown[0].display(), "[unknown] ([unmapped]+0x0)");
    }

    #[test]
    fn a_report_out_of_time_shows_module_and_offset_and_the_next_one_symbolizes() {
        let addr = std::hint::black_box(marker_function_for_symbolizer_test());
        let getpid = libc::getpid as *const () as u64;
        let space = crate::addrspace::AddressSpace::read(std::process::id()).expect("own maps");
        // Two addresses in this binary, one in libc (as a return address: looked up at getpid).
        let stack = UserStack::resolve(&space, &[addr, addr + 3, getpid + 1]);
        let UserFrame::File { path, offset } = &stack.frames[2] else {
            panic!("libc is file-backed: {stack:?}");
        };
        assert!(path.contains("libc"), "{path}");
        let mut s = Symbolizer::new();
        s.begin_report();
        s.want_user(&stack, 1);
        // Out of time from the start: the file with most addresses is still done, not libc.
        s.symbolize_wanted(Some(Instant::now()));
        assert_eq!(s.unsymbolized(), 1);
        let frames = s.user_frames(&stack);
        assert!(frames[0]
            .function
            .contains("marker_function_for_symbolizer_test"));
        assert_eq!(frames.last(), Some(&Frame::unknown(*offset, path, *offset)));
        assert_eq!(s.shown_unsymbolized(), 1);
        let mut ids = Vec::new();
        s.user_ids(&stack, &mut ids);
        assert_eq!(ids.len(), frames.len());
        s.finish();
        // Still wanted: the next report symbolizes it.
        s.begin_report();
        s.want_user(&stack, 1);
        s.symbolize_wanted(None);
        assert_eq!(s.unsymbolized(), 0);
        let frames = s.user_frames(&stack);
        assert_eq!(s.shown_unsymbolized(), 0);
        let last = frames.last().expect("frames");
        assert!(last.function.contains("getpid"), "{frames:?}");
    }
}
