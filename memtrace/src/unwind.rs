//! Recovering the caller of a function that has no frame-pointer frame at the faulting
//! instruction.
//!
//! The kernel walks user stacks along the frame-pointer chain: `ip, [rbp+8], ...`. A function
//! stopped before `mov rbp, rsp` (a leaf built with `-momit-leaf-frame-pointer`, hand-written
//! asm, a function in its prologue, code built without frame pointers) leaves `rbp` pointing
//! at its caller's frame, so the walk reads `leaf -> caller's caller` and loses the caller.
//! With a walked user-mode fault the kernel sends the words at the stack pointer; this module
//! asks the binary's call-frame information (`.eh_frame`, else `.debug_frame`) whether the CFA
//! at the faulting instruction is `rsp + N`, and if so takes the return address from the word
//! at `CFA - 8` (where the CFI says it is) when that word was read.
//!
//! Cost: one memo lookup per walked record, keyed by (file, file offset). A miss evaluates one
//! FDE. A file's `.eh_frame` stays on disk: the agent keeps its `.eh_frame_hdr` search table
//! (8 bytes a function) and an open descriptor, and reads the one FDE and its CIE with four
//! small `pread`s per miss (length, then entry), so a 7 MiB `.eh_frame` (libLLVM) costs ~1 MiB and a truncated file an
//! error, never a SIGBUS. Only `.debug_frame`, or an `.eh_frame` without a search table, is
//! copied and indexed. The memo and the parsed files are bounded.
use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EhFrameHdr, EndianSlice, LittleEndian,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::{Object, ObjectSection, ObjectSegment};

use crate::addrspace::AddressSpace;

/// (file, file offset) decisions remembered; the memo is cleared when it reaches this.
pub const MAX_MEMO: usize = 1 << 16;
/// Parsed files kept (least recently used evicted); each holds a descriptor open.
pub const MAX_FILES: usize = 128;
/// Bytes of CFI (search tables, copied sections and indexes) kept for all files together.
pub const MAX_CACHE_BYTES: usize = 8 << 20;
/// A file whose CFI takes more than this is not kept (its leaves keep their walked stacks).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// An FDE or CIE longer than this is not read (real ones are tens of bytes).
const MAX_ENTRY_BYTES: usize = 64 << 10;

type Slice<'a> = EndianSlice<'a, LittleEndian>;
/// A section's bytes and its address.
type SectionBytes = (Box<[u8]>, u64);

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("ELF: {0}")]
    Object(#[from] object::Error),
    #[error("CFI: {0}")]
    Gimli(#[from] gimli::Error),
    #[error("not an x86_64 ELF file")]
    NotX86_64,
    #[error("no call-frame information")]
    NoCfi,
    #[error("call-frame information of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("unusable .eh_frame_hdr search table")]
    BadTable,
}

/// One FDE: the code it covers and where it is in its section (16 bytes; a large binary has
/// hundreds of thousands).
#[derive(Clone, Copy, Debug)]
struct FdeSpan {
    start: u64,
    len: u32,
    offset: u32,
}

/// A CFI section's bytes and its FDEs sorted by address.
#[derive(Debug)]
struct CfiSection {
    data: Box<[u8]>,
    bases: BaseAddresses,
    fdes: Vec<FdeSpan>,
}

impl CfiSection {
    fn bytes(&self) -> usize {
        self.data.len() + self.fdes.len() * std::mem::size_of::<FdeSpan>()
    }

    fn fde_offset(&self, vaddr: u64) -> Option<usize> {
        let i = self
            .fdes
            .partition_point(|f| f.start <= vaddr)
            .checked_sub(1)?;
        let f = self.fdes.get(i)?;
        (vaddr - f.start < u64::from(f.len)).then_some(f.offset as usize)
    }
}

/// A loadable segment: file bytes `[offset, offset + size)` are mapped at `vaddr`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    size: u64,
    vaddr: u64,
}

/// An `.eh_frame` read from the file on demand through its `.eh_frame_hdr` search table.
#[derive(Debug)]
struct IndexedEhFrame {
    /// Where the section is in the file, and its address.
    file_offset: u64,
    size: u64,
    address: u64,
    text: u64,
    got: u64,
    /// The lowest function start; entries hold starts relative to it.
    base: u64,
    /// (start - base, FDE offset in the section), sorted by start.
    table: Box<[(u32, u32)]>,
}

impl IndexedEhFrame {
    /// The search table of `.eh_frame_hdr` (its bytes and address) for an `.eh_frame`.
    fn new(
        hdr: &[u8],
        hdr_address: u64,
        (file_offset, size, address): (u64, u64, u64),
        (text, got): (u64, u64),
    ) -> Result<Self, LoadError> {
        let bases = BaseAddresses::default()
            .set_eh_frame_hdr(hdr_address)
            .set_eh_frame(address)
            .set_text(text)
            .set_got(got);
        let parsed = EhFrameHdr::new(hdr, LittleEndian).parse(&bases, 8)?;
        let eh_frame_ptr = parsed.eh_frame_ptr().direct()?;
        // FDE offsets are taken from the table, bytes from the section header's place.
        if eh_frame_ptr != address {
            return Err(LoadError::BadTable);
        }
        let table = parsed.table().ok_or(LoadError::BadTable)?;
        let mut entries = Vec::new();
        let mut iter = table.iter(&bases);
        while let Some((start, fde)) = iter.next()? {
            entries.push((start.direct()?, fde.direct()?));
        }
        let base = entries.first().map_or(0, |e| e.0);
        let table = entries
            .iter()
            .map(|&(start, fde)| {
                let start = u32::try_from(start.checked_sub(base)?).ok()?;
                let offset = u32::try_from(fde.checked_sub(eh_frame_ptr)?).ok()?;
                Some((start, offset))
            })
            .collect::<Option<Box<[_]>>>()
            .ok_or(LoadError::BadTable)?;
        if !table.is_sorted_by_key(|e| e.0) {
            return Err(LoadError::BadTable);
        }
        Ok(Self {
            file_offset,
            size,
            address,
            text,
            got,
            base,
            table,
        })
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.table)
    }

    /// Reads the entry (CIE or FDE) at `offset` in the section: its bytes, length included.
    fn read_entry(&self, file: &std::fs::File, offset: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut len = [0u8; 4];
        file.read_exact_at(&mut len, self.file_offset.checked_add(offset)?)
            .ok()?;
        // 0xffffffff announces a 64-bit length: never needed for one function's FDE.
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_ENTRY_BYTES || offset + 4 + len as u64 > self.size {
            return None;
        }
        let mut entry = vec![0u8; 4 + len];
        file.read_exact_at(&mut entry, self.file_offset + offset)
            .ok()?;
        Some(entry)
    }

    /// Where the return address is at `vaddr` (see [`ra_word_in`]).
    fn rule(
        &self,
        file: &std::fs::File,
        vaddr: u64,
        ctx: &mut UnwindContext<usize>,
    ) -> Option<Option<FrameRule>> {
        let key = u32::try_from(vaddr.checked_sub(self.base)?).ok()?;
        let i = self.table.partition_point(|e| e.0 <= key).checked_sub(1)?;
        let fde_offset = u64::from(self.table.get(i)?.1);
        let mut fde = self.read_entry(file, fde_offset)?;
        let cie_pointer = u32::from_le_bytes(fde.get(4..8)?.try_into().ok()?);
        // The CIE pointer counts back from its own field to the CIE.
        let cie_offset = (fde_offset + 4).checked_sub(u64::from(cie_pointer))?;
        let mut entries = self.read_entry(file, cie_offset)?;
        // Lay the CIE and the FDE side by side, the FDE's pointer counting back to the CIE,
        // and put the section where pc-relative addresses in the FDE still come out right
        // (the CIE's own, such as its personality routine, do not: nothing here uses them).
        let at = entries.len();
        let pointer = u32::try_from(at + 4).ok()?;
        fde.get_mut(4..8)?.copy_from_slice(&pointer.to_le_bytes());
        entries.extend_from_slice(&fde);
        let address = (self.address + fde_offset).checked_sub(at as u64)?;
        let bases = BaseAddresses::default()
            .set_eh_frame(address)
            .set_text(self.text)
            .set_got(self.got);
        let mut section = EhFrame::new(&entries, LittleEndian);
        section.set_address_size(8);
        rule_in(&section, &bases, at, vaddr, ctx)
    }
}

/// The CFI of one ELF file.
#[derive(Debug)]
struct FileCfi {
    file: std::fs::File,
    segments: Vec<Segment>,
    indexed: Option<IndexedEhFrame>,
    eh_frame: Option<CfiSection>,
    debug_frame: Option<CfiSection>,
}

/// The sorted FDE index of a CFI section.
fn index_fdes<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
) -> Result<Vec<FdeSpan>, LoadError> {
    let mut fdes = Vec::new();
    let mut entries = section.entries(bases);
    // FDEs nearly always share one CIE: parse it once, not once per FDE.
    let mut last_cie: Option<(S::Offset, gimli::CommonInformationEntry<Slice<'a>>)> = None;
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let fde = partial.parse(|s, b, o| match &last_cie {
            Some((off, cie)) if *off == o => Ok(cie.clone()),
            _ => {
                let cie = s.cie_from_offset(b, o)?;
                last_cie = Some((o, cie.clone()));
                Ok(cie)
            }
        });
        // One malformed FDE loses its function, not the file.
        let Ok(fde) = fde else { continue };
        let (Ok(len), Ok(offset)) = (u32::try_from(fde.len()), u32::try_from(fde.offset())) else {
            continue;
        };
        if len > 0 {
            fdes.push(FdeSpan {
                start: fde.initial_address(),
                len,
                offset,
            });
        }
    }
    fdes.sort_unstable_by_key(|f| f.start);
    fdes.shrink_to_fit();
    Ok(fdes)
}

impl FileCfi {
    fn load(path: &str) -> Result<Self, LoadError> {
        Self::load_with(path, true)
    }

    /// [`FileCfi::load`]; `search_table` false copies `.eh_frame` even when it has one.
    fn load_with(path: &str, search_table: bool) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path)?;
        // Read through a cache: only the headers and the CFI sections are read, not the file.
        let cache = object::ReadCache::new(file.try_clone()?);
        let obj = object::File::parse(&cache)?;
        if obj.architecture() != object::Architecture::X86_64 || !obj.is_little_endian() {
            return Err(LoadError::NotX86_64);
        }
        let segments = obj
            .segments()
            .filter_map(|s| {
                let (offset, size) = s.file_range();
                (size > 0).then_some(Segment {
                    offset,
                    size,
                    vaddr: s.address(),
                })
            })
            .collect();
        let addr_of = |name: &str| obj.section_by_name(name).map_or(0, |s| s.address());
        let data_of = |name: &str| -> Result<Option<SectionBytes>, LoadError> {
            let Some(s) = obj.section_by_name(name) else {
                return Ok(None);
            };
            let size = usize::try_from(s.size()).unwrap_or(usize::MAX);
            if size > MAX_FILE_BYTES {
                return Err(LoadError::TooLarge(size));
            }
            Ok(Some((Box::from(s.data()?), s.address())))
        };
        // An .eh_frame with a search table stays on disk.
        let indexed = match (
            obj.section_by_name(".eh_frame"),
            obj.section_by_name(".eh_frame_hdr"),
        ) {
            (Some(eh), Some(hdr)) if search_table => match (eh.file_range(), hdr.data()) {
                (Some((offset, size)), Ok(hdr_data)) => IndexedEhFrame::new(
                    hdr_data,
                    hdr.address(),
                    (offset, size, eh.address()),
                    (addr_of(".text"), addr_of(".got")),
                )
                .inspect_err(|e| log::debug!("{path}: {e}"))
                .ok(),
                _ => None,
            },
            _ => None,
        };
        let eh_frame = match indexed
            .is_none()
            .then(|| data_of(".eh_frame"))
            .transpose()?
            .flatten()
        {
            Some((data, address)) => {
                let bases = BaseAddresses::default()
                    .set_eh_frame(address)
                    .set_text(addr_of(".text"))
                    .set_got(addr_of(".got"));
                let mut section = EhFrame::new(&data, LittleEndian);
                section.set_address_size(8);
                let fdes = index_fdes(&section, &bases)?;
                Some(CfiSection { data, bases, fdes })
            }
            None => None,
        };
        let debug_frame = match data_of(".debug_frame")? {
            Some((data, _)) => {
                let bases = BaseAddresses::default();
                let mut section = DebugFrame::new(&data, LittleEndian);
                section.set_address_size(8);
                let fdes = index_fdes(&section, &bases)?;
                Some(CfiSection { data, bases, fdes })
            }
            None => None,
        };
        drop(obj);
        drop(cache);
        let cfi = Self {
            file,
            segments,
            indexed,
            eh_frame: eh_frame.filter(|s| !s.fdes.is_empty()),
            debug_frame: debug_frame.filter(|s| !s.fdes.is_empty()),
        };
        if cfi.indexed.is_none() && cfi.eh_frame.is_none() && cfi.debug_frame.is_none() {
            return Err(LoadError::NoCfi);
        }
        if cfi.bytes() > MAX_FILE_BYTES {
            return Err(LoadError::TooLarge(cfi.bytes()));
        }
        Ok(cfi)
    }

    fn bytes(&self) -> usize {
        self.indexed.as_ref().map_or(0, IndexedEhFrame::bytes)
            + self.eh_frame.as_ref().map_or(0, CfiSection::bytes)
            + self.debug_frame.as_ref().map_or(0, CfiSection::bytes)
            + self.segments.len() * std::mem::size_of::<Segment>()
    }

    /// The virtual address (as the CFI names code) of a file offset.
    fn vaddr(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.size)
            .map(|s| offset - s.offset + s.vaddr)
    }

    /// Where the return address is at `vaddr`, in words above rsp, when the CFA is rsp-based;
    /// `None` when it is based on another register (a frame-pointer frame), an expression, or
    /// no CFI covers `vaddr`.
    fn rule(&self, vaddr: u64, ctx: &mut UnwindContext<usize>) -> Option<FrameRule> {
        if let Some(indexed) = &self.indexed {
            if let Some(rule) = indexed.rule(&self.file, vaddr, ctx) {
                return rule;
            }
        }
        if let Some(s) = &self.eh_frame {
            if let Some(offset) = s.fde_offset(vaddr) {
                let mut section = EhFrame::new(&s.data, LittleEndian);
                section.set_address_size(8);
                return rule_in(&section, &s.bases, offset, vaddr, ctx).flatten();
            }
        }
        let s = self.debug_frame.as_ref()?;
        let offset = s.fde_offset(vaddr)?;
        let mut section = DebugFrame::new(&s.data, LittleEndian);
        section.set_address_size(8);
        rule_in(&section, &s.bases, offset, vaddr, ctx).flatten()
    }
}

/// How to find the caller's frame at one instruction, from the CFI: the CFA is `rsp` or `rbp`
/// plus `cfa_offset`, the return address is at `CFA + ra_offset`, and the caller's `rbp` at
/// `CFA + rbp_offset` when this function saved it (else `rbp` is the caller's still).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRule {
    pub cfa_from_rbp: bool,
    pub cfa_offset: i64,
    pub ra_offset: i64,
    pub rbp_offset: Option<i64>,
}

impl FrameRule {
    /// The word above rsp holding the return address, when the CFA is rsp-based.
    fn ra_word(self) -> Option<usize> {
        if self.cfa_from_rbp {
            return None;
        }
        ra_word_of(self.cfa_offset, self.ra_offset)
    }
}

/// The frame rule at `vaddr` by the FDE at `fde_offset`: `None` when that FDE cannot be read
/// or does not cover `vaddr`, `Some(None)` when the rule is not one of rsp/rbp plus an offset
/// with the return address saved at an offset from it.
fn rule_in<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    fde_offset: usize,
    vaddr: u64,
    ctx: &mut UnwindContext<usize>,
) -> Option<Option<FrameRule>> {
    let fde = section
        .fde_from_offset(bases, fde_offset.into(), |s, b, o| s.cie_from_offset(b, o))
        .ok()?;
    if !fde.contains(vaddr) {
        return None;
    }
    let Ok(row) = fde.unwind_info_for_address(section, bases, ctx, vaddr) else {
        return Some(None);
    };
    let CfaRule::RegisterAndOffset { register, offset } = *row.cfa() else {
        return Some(None);
    };
    let cfa_from_rbp = match register {
        X86_64::RSP => false,
        X86_64::RBP => true,
        _ => return Some(None),
    };
    let Some(RegisterRule::Offset(ra)) = row.register(X86_64::RA) else {
        return Some(None);
    };
    let rbp_offset = match row.register(X86_64::RBP) {
        Some(RegisterRule::Offset(o)) => Some(o),
        _ => None,
    };
    Some(Some(FrameRule {
        cfa_from_rbp,
        cfa_offset: offset,
        ra_offset: ra,
        rbp_offset,
    }))
}

/// The word index above rsp of a return address saved at `CFA + ra_offset` with
/// CFA = rsp + `cfa_offset`.
fn ra_word_of(cfa_offset: i64, ra_offset: i64) -> Option<usize> {
    let at = cfa_offset.checked_add(ra_offset)?;
    (at >= 0 && at % 8 == 0)
        .then(|| usize::try_from(at / 8).ok())
        .flatten()
}

/// The return address to insert as the faulting function's caller: the word the CFI points
/// at, when it was read, is not zero, and is not already the walk's next frame.
pub fn caller_to_insert(ra_word: usize, words: &[u64], next: Option<u64>) -> Option<u64> {
    let ra = *words.get(ra_word)?;
    (ra != 0 && Some(ra) != next).then_some(ra)
}

struct FileSlot {
    cfi: Option<FileCfi>,
    last_used: u64,
}

/// Decisions per (file, offset) and the parsed CFI of recently used files.
pub struct UnwindCache {
    memo: HashMap<(Arc<str>, u64), Option<FrameRule>>,
    files: HashMap<Arc<str>, FileSlot>,
    bytes: usize,
    tick: u64,
    ctx: Box<UnwindContext<usize>>,
    /// Frames inserted so far.
    pub recovered: u64,
}

impl Default for UnwindCache {
    fn default() -> Self {
        Self {
            memo: HashMap::new(),
            files: HashMap::new(),
            bytes: 0,
            tick: 0,
            ctx: Box::new(UnwindContext::new()),
            recovered: 0,
        }
    }
}

impl std::fmt::Debug for UnwindCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwindCache")
            .field("memo", &self.memo.len())
            .field("files", &self.files.len())
            .field("bytes", &self.bytes)
            .field("recovered", &self.recovered)
            .finish()
    }
}

impl UnwindCache {
    /// Where the return address is, in words above rsp, at `offset` in the ELF file `path`
    /// (see [`FileCfi::rule`]); `None` also when the file cannot be read.
    pub fn ra_word(&mut self, path: &Arc<str>, offset: u64) -> Option<usize> {
        self.rule(path, offset)?.ra_word()
    }

    /// The frame rule at `offset` in the ELF file `path`, remembered.
    pub fn rule(&mut self, path: &Arc<str>, offset: u64) -> Option<FrameRule> {
        let key = (path.clone(), offset);
        if let Some(&rule) = self.memo.get(&key) {
            return rule;
        }
        let rule = self.compute(path, offset);
        if self.memo.len() >= MAX_MEMO {
            self.memo.clear();
        }
        self.memo.insert(key, rule);
        rule
    }

    fn compute(&mut self, path: &Arc<str>, offset: u64) -> Option<FrameRule> {
        self.tick += 1;
        if !self.files.contains_key(path) {
            let cfi = FileCfi::load(path)
                .inspect_err(|e| log::debug!("no CFI for {path}: {e}"))
                .ok();
            let bytes = cfi.as_ref().map_or(0, FileCfi::bytes);
            self.make_room(bytes);
            self.bytes += bytes;
            self.files.insert(
                path.clone(),
                FileSlot {
                    cfi,
                    last_used: self.tick,
                },
            );
        }
        let slot = self.files.get_mut(path)?;
        slot.last_used = self.tick;
        let cfi = slot.cfi.as_ref()?;
        cfi.rule(cfi.vaddr(offset)?, &mut self.ctx)
    }

    /// Unwinds a user stack by its CFI (`.eh_frame`) from the registers at `ip`, `sp` and
    /// `bp`, reading saved words from `copy`, the bytes from `sp` up: what a frame-pointer
    /// walk cannot do through code built without frame pointers (glibc's malloc). Returns the
    /// frames, innermost first; it stops where the CFI or the copy ends.
    pub fn unwind(
        &mut self,
        space: &AddressSpace,
        ip: u64,
        sp: u64,
        bp: u64,
        copy: &[u8],
    ) -> Vec<u64> {
        let word = |addr: u64| -> Option<u64> {
            let at = usize::try_from(addr.checked_sub(sp)?).ok()?;
            Some(u64::from_le_bytes(copy.get(at..at + 8)?.try_into().ok()?))
        };
        let mut frames = vec![ip];
        let (mut pc, mut rsp, mut rbp) = (ip, sp, bp);
        while frames.len() < memtrace_common::MAX_STACK_DEPTH {
            // A return address is looked up at the call before it.
            let lookup = if frames.len() == 1 { pc } else { pc - 1 };
            let Some(vma) = space.find(lookup).filter(|v| v.exec) else {
                break;
            };
            let Some(path) = vma.path.clone().filter(|p| p.starts_with('/')) else {
                break;
            };
            let Some(rule) = self.rule(&path, vma.file_offset(lookup)) else {
                break;
            };
            let base = if rule.cfa_from_rbp { rbp } else { rsp };
            let Some(cfa) = base.checked_add_signed(rule.cfa_offset) else {
                break;
            };
            let Some(ra) = cfa.checked_add_signed(rule.ra_offset).and_then(word) else {
                break;
            };
            if let Some(o) = rule.rbp_offset {
                match cfa.checked_add_signed(o).and_then(word) {
                    Some(v) => rbp = v,
                    None => break,
                }
            }
            // The stack grows down: a caller's frame is above its callee's.
            if ra == 0 || cfa <= rsp {
                break;
            }
            rsp = cfa;
            pc = ra;
            frames.push(ra);
        }
        frames
    }

    /// Evicts least recently used files until one of `bytes` more fits.
    fn make_room(&mut self, bytes: usize) {
        while !self.files.is_empty()
            && (self.files.len() >= MAX_FILES || self.bytes + bytes > MAX_CACHE_BYTES)
        {
            let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some(s) = self.files.remove(&oldest) {
                self.bytes -= s.cfi.as_ref().map_or(0, FileCfi::bytes);
            }
        }
    }

    /// For a walked user stack `frames[..n_user]` (innermost first) and the words read at the
    /// stack pointer: inserts the faulting function's caller as `frames[1]` when the CFI says
    /// the function has no frame-pointer frame at the faulting instruction and the return
    /// address is among the words. Returns whether it inserted one.
    pub fn recover_caller(
        &mut self,
        space: &AddressSpace,
        words: &[u64],
        frames: &mut Vec<u64>,
        n_user: usize,
    ) -> bool {
        let Some(&ip) = frames.first().filter(|_| n_user > 0) else {
            return false;
        };
        let Some(vma) = space.find(ip).filter(|v| v.exec) else {
            return false;
        };
        let Some(path) = vma.path.as_ref().filter(|p| p.starts_with('/')) else {
            return false;
        };
        let Some(word) = self.ra_word(path, vma.file_offset(ip)) else {
            return false;
        };
        let next = frames.get(1).copied().filter(|_| n_user > 1);
        let Some(ra) = caller_to_insert(word, words, next) else {
            return false;
        };
        // A return address points just past a call in executable memory; anything else is a
        // stale or misread word, and would cut the stack where it resolves.
        if !space.find(ra.saturating_sub(1)).is_some_and(|v| v.exec) {
            return false;
        }
        frames.insert(1, ra);
        self.recovered += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function the test looks up; `naked` would need nightly, so this relies on the CFI of
    /// an ordinary function (CFA = rsp + 8 at its first instruction, as at every entry).
    #[inline(never)]
    fn probe(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    fn own_exe() -> (AddressSpace, Arc<str>, u64) {
        let space = AddressSpace::read(std::process::id()).expect("own maps");
        let addr = probe as *const () as u64;
        let vma = space.find(addr).expect("mapped").clone();
        let path = vma.path.clone().expect("a file");
        (space, path, vma.file_offset(addr))
    }

    #[test]
    fn function_entry_has_the_return_address_at_rsp() {
        let (_, path, offset) = own_exe();
        let mut cache = UnwindCache::default();
        assert_eq!(
            cache.ra_word(&path, offset),
            Some(0),
            "CFA = rsp + 8 at entry"
        );
        // Memoized: the second answer comes without parsing.
        assert_eq!(cache.memo.len(), 1);
        assert_eq!(cache.ra_word(&path, offset), Some(0));
        assert_eq!(cache.files.len(), 1);
    }

    #[test]
    fn frame_pointer_body_is_rbp_based() {
        // The workspace builds with frame pointers: after `push rbp; mov rbp, rsp` the CFA is
        // rbp-based for the rest of the function. Scan the body for that.
        let (_, path, offset) = own_exe();
        let mut cache = UnwindCache::default();
        let words: Vec<_> = (0..32).map(|i| cache.ra_word(&path, offset + i)).collect();
        assert_eq!(words[0], Some(0));
        assert!(words.contains(&Some(1)), "after push rbp: {words:?}");
        assert!(words.contains(&None), "rbp-based body: {words:?}");
    }

    #[test]
    fn libc_leaf_is_rsp_based() {
        // Debian's libc is built without frame pointers: its functions are rsp-based throughout.
        let space = AddressSpace::read(std::process::id()).expect("own maps");
        let strlen = libc::strlen as *const () as u64;
        let vma = space.find(strlen).expect("strlen mapped");
        assert!(vma.exec);
        let path = vma.path.clone().expect("libc's path");
        assert!(path.contains("libc"), "{path}");
        let mut cache = UnwindCache::default();
        // strlen is an ifunc-selected asm routine; the PLT-resolved address is its entry.
        assert_eq!(cache.ra_word(&path, vma.file_offset(strlen)), Some(0));
    }

    #[test]
    fn unreadable_files_change_nothing() {
        let mut cache = UnwindCache::default();
        assert_eq!(
            cache.ra_word(&Arc::from("/nonexistent/binary"), 0x1000),
            None
        );
        assert_eq!(cache.ra_word(&Arc::from("/proc/self/status"), 0), None);
        let offset_outside_segments = u64::MAX / 2;
        let (_, path, _) = own_exe();
        assert_eq!(cache.ra_word(&path, offset_outside_segments), None);
    }

    #[test]
    fn the_search_table_reads_the_same_cfi_as_a_copy() {
        let (_, path, offset) = own_exe();
        let on_disk = FileCfi::load(&path).expect("own CFI");
        assert!(on_disk.indexed.is_some() && on_disk.eh_frame.is_none());
        let copied = FileCfi::load_with(&path, false).expect("own CFI, copied");
        assert!(copied.indexed.is_none() && copied.eh_frame.is_some());
        assert!(on_disk.bytes() < copied.bytes() / 4);
        let mut ctx = UnwindContext::new();
        let (mut rsp_based, mut other) = (0, 0);
        // Every 13th byte over 256 KiB of code around a known function.
        for off in (offset.saturating_sub(128 << 10)..offset + (128 << 10)).step_by(13) {
            let Some(vaddr) = on_disk.vaddr(off) else {
                continue;
            };
            let rule = on_disk.rule(vaddr, &mut ctx);
            assert_eq!(rule, copied.rule(vaddr, &mut ctx), "at {off:#x}");
            let word = rule.and_then(FrameRule::ra_word);
            match word {
                Some(_) => rsp_based += 1,
                None => other += 1,
            }
        }
        assert!(rsp_based > 100 && other > 100, "{rsp_based} {other}");
    }

    #[test]
    fn cfa_offsets_map_to_words() {
        assert_eq!(ra_word_of(8, -8), Some(0));
        assert_eq!(ra_word_of(16, -8), Some(1));
        assert_eq!(ra_word_of(4, -8), None);
        assert_eq!(ra_word_of(12, -8), None);
    }

    #[test]
    fn inserts_only_a_read_new_word() {
        let words = [0x1111, 0x2222];
        assert_eq!(caller_to_insert(0, &words, Some(0x9999)), Some(0x1111));
        assert_eq!(caller_to_insert(1, &words, None), Some(0x2222));
        assert_eq!(caller_to_insert(2, &words, None), None, "not read");
        assert_eq!(
            caller_to_insert(0, &words, Some(0x1111)),
            None,
            "already there"
        );
        assert_eq!(caller_to_insert(0, &[0, 1], None), None, "zero");
    }

    #[test]
    fn recovers_the_caller_of_a_function_at_entry() {
        let (space, _, _) = own_exe();
        let entry = probe as *const () as u64;
        let caller = recovers_the_caller_of_a_function_at_entry as *const () as u64 + 5;
        let grandparent = 0x1234;
        let mut cache = UnwindCache::default();
        let mut frames = vec![entry, grandparent, 0xffff_ffff_8100_0000];
        assert!(cache.recover_caller(&space, &[caller, 0], &mut frames, 2));
        assert_eq!(
            frames,
            vec![entry, caller, grandparent, 0xffff_ffff_8100_0000]
        );
        // Already the next frame: nothing inserted.
        let mut frames = vec![entry, caller];
        assert!(!cache.recover_caller(&space, &[caller, 0], &mut frames, 2));
        // A word that is not a return address into code: nothing inserted.
        let mut frames = vec![entry, grandparent];
        assert!(!cache.recover_caller(&space, &[0x10, 0], &mut frames, 2));
        assert_eq!(frames, vec![entry, grandparent]);
        assert_eq!(cache.recovered, 1);
    }

    #[test]
    fn eviction_keeps_the_cache_bounded() {
        let (_, path, offset) = own_exe();
        let mut cache = UnwindCache::default();
        for i in 0..MAX_FILES + 10 {
            cache.ra_word(&Arc::from(format!("/nonexistent/{i}")), 0);
        }
        assert!(cache.files.len() <= MAX_FILES);
        assert_eq!(cache.ra_word(&path, offset), Some(0));
        assert!(cache.files.len() <= MAX_FILES);
        assert!(cache.bytes > 0 && cache.bytes <= MAX_CACHE_BYTES);
    }
}
