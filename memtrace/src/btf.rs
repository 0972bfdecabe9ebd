//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to answer two questions before
//! loading: where fields sit in a kernel struct (`struct kmem_cache`'s name and sizes, read
//! once per cache), and what arguments a raw tracepoint passes (its `btf_trace_<name>`
//! prototype), so a raw program never reads an argument the running kernel moved.
use std::collections::HashMap;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data truncated")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
}

/// One BTF type, as laid out in the type section.
#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// Size, or the id of the type this one refers to.
    size_or_type: u32,
    /// Byte offset of what follows the header (members, params) in the type section.
    extra: usize,
}

/// Parsed BTF: type headers by id, and the string section.
pub struct Btf {
    types: Vec<TypeHeader>,
    type_data: Vec<u8>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(BtfError::Truncated)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Truncated)
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, String> {
        let data = std::fs::read(VMLINUX).map_err(|e| format!("{VMLINUX}: {e}"))?;
        Self::parse(&data).map_err(|e| format!("{VMLINUX}: {e}"))
    }

    /// Parses little-endian BTF (what x86_64 and arm64 kernels carry).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Truncated)?;
            data.get(start..start.checked_add(len).ok_or(BtfError::Truncated)?)
                .ok_or(BtfError::Truncated)
        };
        let type_data = section(type_off, type_len)?.to_vec();
        let strings = section(str_off, str_len)?.to_vec();
        // Id 0 is void; real types start at 1.
        let mut types = vec![TypeHeader {
            name_off: 0,
            kind: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            extra: 0,
        }];
        let mut by_name = HashMap::new();
        let mut at = 0;
        while at < type_data.len() {
            let info = u32_at(&type_data, at + 4)?;
            let t = TypeHeader {
                name_off: u32_at(&type_data, at)?,
                kind: (info >> 24) & 0x1f,
                vlen: info & 0xffff,
                kind_flag: info >> 31 != 0,
                size_or_type: u32_at(&type_data, at + 8)?,
                extra: at + 12,
            };
            let vlen = t.vlen as usize;
            let extra = match t.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_TYPE_TAG | 12 | 16 => 0,
                k => return Err(BtfError::UnknownKind(k)),
            };
            if matches!(t.kind, KIND_STRUCT | KIND_TYPEDEF) && t.name_off != 0 {
                let name = str_at(&strings, t.name_off).to_string();
                by_name.entry((t.kind, name)).or_insert(types.len() as u32);
            }
            types.push(t);
            at = t.extra + extra;
        }
        Ok(Self {
            types,
            type_data,
            strings,
            by_name,
        })
    }

    fn name(&self, t: &TypeHeader) -> &str {
        str_at(&self.strings, t.name_off)
    }

    /// The byte offset of `member` in `struct name` (members of anonymous inner structs and
    /// unions included).
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let id = *self.by_name.get(&(KIND_STRUCT, name.to_string()))?;
        self.find_member(id, member, 0).map(|bits| bits / 8)
    }

    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for i in 0..t.vlen as usize {
            let at = t.extra + 12 * i;
            let name_off = u32_at(&self.type_data, at).ok()?;
            let ty = u32_at(&self.type_data, at + 4).ok()?;
            let raw = u32_at(&self.type_data, at + 8).ok()?;
            // With kind_flag, the low 24 bits are the bit offset and the rest a bitfield size.
            let bits = if t.kind_flag { raw & 0xff_ffff } else { raw };
            if name_off == 0 {
                if let Some(inner) = self.find_member(self.skip_modifiers(ty), member, depth + 1) {
                    return Some(bits + inner);
                }
            } else if str_at(&self.strings, name_off) == member {
                return Some(bits);
            }
        }
        None
    }

    /// Follows const, volatile, restrict and type tags (not typedefs).
    fn skip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// A short C spelling of a type: `unsigned long`, `gfp_t`, `struct kmem_cache *`, `void *`.
    pub fn describe(&self, id: u32) -> String {
        let id = self.skip_modifiers(id);
        let Some(t) = self.types.get(id as usize) else {
            return "?".into();
        };
        match t.kind {
            0 => "void".into(),
            KIND_PTR => format!("{} *", self.describe(t.size_or_type)),
            KIND_STRUCT => format!("struct {}", self.name(t)),
            KIND_UNION => format!("union {}", self.name(t)),
            KIND_ENUM | KIND_ENUM64 => format!("enum {}", self.name(t)),
            KIND_INT => c_int_name(self.name(t)).to_string(),
            _ => self.name(t).to_string(),
        }
    }

    /// The arguments a raw tracepoint's program receives, as [`Btf::describe`] spells them:
    /// the `btf_trace_<name>` prototype without its leading `void *` (the tracepoint's data).
    pub fn raw_tracepoint_args(&self, tracepoint: &str) -> Option<Vec<String>> {
        let typedef = *self
            .by_name
            .get(&(KIND_TYPEDEF, format!("btf_trace_{tracepoint}")))?;
        let ptr = self.types.get(typedef as usize)?;
        let proto = self
            .types
            .get(self.skip_modifiers(ptr.size_or_type) as usize)?;
        let proto = self
            .types
            .get(self.skip_modifiers(proto.size_or_type) as usize)?;
        if proto.kind != KIND_FUNC_PROTO {
            return None;
        }
        let params = (0..proto.vlen as usize)
            .map(|i| u32_at(&self.type_data, proto.extra + 8 * i + 4).map(|ty| self.describe(ty)))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(params.into_iter().skip(1).collect())
    }
}

/// GCC names integer types in its own word order in BTF ("long unsigned int"); the usual C
/// spelling is what programs are described with.
fn c_int_name(name: &str) -> &str {
    match name {
        "long unsigned int" => "unsigned long",
        "long int" => "long",
        "long long unsigned int" => "unsigned long long",
        "long long int" => "long long",
        "short unsigned int" => "unsigned short",
        "short int" => "short",
        other => other,
    }
}

fn str_at(strings: &[u8], off: u32) -> &str {
    let rest = strings.get(off as usize..).unwrap_or(&[]);
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

/// Does a raw tracepoint pass what a program expects? `expected` lists the leading arguments
/// the program reads (as [`Btf::describe`] spells them); `None` when they match, else why not.
pub fn check_raw_args(btf: &Btf, tracepoint: &str, expected: &[&str]) -> Option<String> {
    let Some(args) = btf.raw_tracepoint_args(tracepoint) else {
        return Some(format!("no prototype for {tracepoint} in the kernel's BTF"));
    };
    let found: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .take(expected.len())
        .collect();
    (found != expected).then(|| {
        format!(
            "{tracepoint} passes ({}), memtrace reads ({})",
            args.join(", "),
            expected.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF with: 1 int "unsigned long", 2 struct kmem_cache { unsigned long a; union {
    /// unsigned long b; }; const char *name; }, 3 anonymous union, 4 ptr->5, 5 const->6,
    /// 6 int "char", 7 ptr->2, 8 func_proto(void *, unsigned long, struct kmem_cache *),
    /// 9 ptr->8, 10 typedef btf_trace_kmem_cache_free -> 9.
    fn sample() -> Vec<u8> {
        let strings =
            b"\0long unsigned int\0kmem_cache\0a\0b\0name\0char\0btf_trace_kmem_cache_free\0";
        let s = |name: &str| {
            let pat = [name.as_bytes(), b"\0"].concat();
            strings.windows(pat.len()).position(|w| w == pat).unwrap() as u32
        };
        let mut t = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name_off, kind << 24 | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s("long unsigned int"), KIND_INT, 0, 8, &[64]);
        ty(
            s("kmem_cache"),
            KIND_STRUCT,
            3,
            24,
            &[s("a"), 1, 0, 0, 3, 64, s("name"), 4, 128],
        );
        ty(0, KIND_UNION, 1, 8, &[s("b"), 1, 0]);
        ty(0, KIND_PTR, 0, 5, &[]);
        ty(0, KIND_CONST, 0, 6, &[]);
        ty(s("char"), KIND_INT, 0, 1, &[8]);
        ty(0, KIND_PTR, 0, 2, &[]);
        ty(0, KIND_FUNC_PROTO, 3, 0, &[0, 11, 0, 1, 0, 7]);
        ty(0, KIND_PTR, 0, 8, &[]);
        ty(s("btf_trace_kmem_cache_free"), KIND_TYPEDEF, 0, 9, &[]);
        // void * at id 11
        ty(0, KIND_PTR, 0, 0, &[]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member_offset("kmem_cache", "a"), Some(0));
        assert_eq!(btf.member_offset("kmem_cache", "b"), Some(8));
        assert_eq!(btf.member_offset("kmem_cache", "name"), Some(16));
        assert_eq!(btf.member_offset("kmem_cache", "size"), None);
        assert_eq!(btf.member_offset("page", "name"), None);
    }

    #[test]
    fn reads_raw_tracepoint_prototypes() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(
            btf.raw_tracepoint_args("kmem_cache_free").unwrap(),
            ["unsigned long", "struct kmem_cache *"]
        );
        assert_eq!(
            check_raw_args(&btf, "kmem_cache_free", &["unsigned long"]),
            None
        );
        assert!(
            check_raw_args(&btf, "kmem_cache_free", &["unsigned long", "void *"])
                .unwrap()
                .contains("struct kmem_cache *")
        );
        assert!(check_raw_args(&btf, "kmalloc", &[])
            .unwrap()
            .contains("no prototype"));
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert_eq!(Btf::parse(b"\x7fELF").err(), Some(BtfError::BadHeader));
        let mut cut = sample();
        cut.truncate(40);
        assert_eq!(Btf::parse(&cut).err(), Some(BtfError::Truncated));
    }
}
