//! Stack symbolization with blazesym.
//!
//! User frames are resolved through the agent's own model of the process's mappings (file and
//! file offset), not through `/proc/PID`, so stacks of processes that have exited still
//! symbolize. Results are cached per (file, offset) and per kernel address.
use foldhash::{HashMap, HashMapExt};
use std::{path::PathBuf, sync::Arc};

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

pub struct Symbolizer {
    blaze: Blaze,
    /// Per file: symbolize with its DWARF (small enough) or its symbol tables only.
    use_dwarf: HashMap<Arc<str>, bool>,
    user_cache: HashMap<(Arc<str>, u64), Vec<Frame>>,
    kernel_cache: HashMap<u64, Vec<Frame>>,
    /// Small ids for what a frame means when merging callsites (see [`Symbolizer::merge_ids`]).
    merge_names: HashMap<String, u32>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

fn frames_from(sym: Symbolized<'_>, address: u64, module: &str, offset: u64) -> Vec<Frame> {
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

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: Blaze::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .build(),
            use_dwarf: HashMap::new(),
            user_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
            merge_names: HashMap::new(),
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

    /// Symbolizes a resolved user stack (innermost first).
    pub fn user_frames(&mut self, stack: &UserStack) -> Vec<Frame> {
        let mut out = Vec::with_capacity(stack.frames.len());
        for frame in &stack.frames {
            let (path, offset) = match frame {
                UserFrame::File { path, offset } => (path, *offset),
                UserFrame::Anon { name, offset } => {
                    out.push(Frame::unknown(*offset, name, *offset));
                    continue;
                }
                UserFrame::Unmapped => {
                    out.push(Frame::unknown(0, "[unmapped]", 0));
                    continue;
                }
            };
            let key = (path.clone(), offset);
            if let Some(frames) = self.user_cache.get(&key) {
                out.extend(frames.iter().cloned());
                continue;
            }
            let src = self.elf_source(path);
            let frames = match self.blaze.symbolize_single(&src, Input::FileOffset(offset)) {
                Ok(sym) => frames_from(sym, offset, path, offset),
                Err(_) => vec![Frame::unknown(offset, path, offset)],
            };
            out.extend(frames.iter().cloned());
            self.user_cache.insert(key, frames);
        }
        out
    }

    /// What each frame means when callsites merge, as small ids: the function (and module)
    /// for named frames, the module and offset for frames no symbol names (so two unknown
    /// functions of one module stay apart).
    pub fn merge_ids(&mut self, frames: &[Frame]) -> Vec<u32> {
        frames
            .iter()
            .map(|f| {
                let name = if f.function == "[unknown]" {
                    format!("{}+0x{:x}", f.module, f.offset)
                } else {
                    format!("{}@{}", f.function, f.module)
                };
                let next = self.merge_names.len() as u32;
                *self.merge_names.entry(name).or_insert(next)
            })
            .collect()
    }

    /// Symbolizes a kernel stack (innermost first) with /proc/kallsyms.
    pub fn kernel_stack(&mut self, ips: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            if let Some(frames) = self.kernel_cache.get(&ip) {
                out.extend(frames.iter().cloned());
                continue;
            }
            let kernel = Kernel {
                vmlinux: MaybeDefault::None,
                ..Kernel::default()
            };
            let src = Source::Kernel(kernel);
            let frames = match self.blaze.symbolize_single(&src, Input::AbsAddr(ip)) {
                Ok(sym) => frames_from(sym, ip, "[kernel]", ip),
                Err(_) => vec![Frame::unknown(ip, "[kernel]", ip)],
            };
            out.extend(frames.iter().cloned());
            self.kernel_cache.insert(ip, frames);
        }
        out
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
