//! Decoding ring-buffer records (plain bytes in, typed records out).
use memtrace_common::{FaultRecord, ProcRecord, RecordKind, VmaRecord};

#[derive(Clone, Copy, Debug)]
pub enum Record {
    Fault(FaultRecord),
    Vma(VmaRecord),
    Proc(ProcRecord),
}

fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above, `T: Pod` makes every bit pattern valid, and
    // `read_unaligned` places no alignment requirement on the source.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Decodes one record; `None` for a truncated record or an unknown tag.
pub fn decode(bytes: &[u8]) -> Option<Record> {
    let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match RecordKind::from_u32(tag)? {
        RecordKind::Fault => read(bytes).map(Record::Fault),
        RecordKind::Vma => read(bytes).map(Record::Vma),
        RecordKind::Proc => read(bytes).map(Record::Proc),
    }
}

/// A NUL-padded `comm` as a string.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: aya::Pod>(v: &T) -> Vec<u8> {
        // SAFETY: `T: Pod` has no padding or invalid bytes; the slice covers exactly `v`.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_each_kind_and_rejects_garbage() {
        let f = FaultRecord {
            kind: RecordKind::Fault as u32,
            pid: 5,
            address: 0x1234,
            ..Default::default()
        };
        match decode(&bytes_of(&f)) {
            Some(Record::Fault(r)) => assert_eq!((r.pid, r.address), (5, 0x1234)),
            other => panic!("{other:?}"),
        }
        let v = VmaRecord {
            kind: RecordKind::Vma as u32,
            len: 8192,
            ..Default::default()
        };
        assert!(matches!(decode(&bytes_of(&v)), Some(Record::Vma(r)) if r.len == 8192));
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        let p = ProcRecord {
            kind: RecordKind::Proc as u32,
            comm,
            ..Default::default()
        };
        assert!(
            matches!(decode(&bytes_of(&p)), Some(Record::Proc(r)) if comm_str(&r.comm) == "bash")
        );
        assert!(decode(&bytes_of(&f)[..20]).is_none(), "truncated");
        assert!(decode(&[9, 0, 0, 0, 1, 2, 3, 4]).is_none(), "unknown tag");
        assert!(decode(&[]).is_none());
    }
}
