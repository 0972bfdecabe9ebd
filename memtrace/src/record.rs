//! Decoding ring-buffer records (plain bytes in, typed records out).
use memtrace_common::{
    BatchedFault, FaultBatch, FaultRecord, ProcRecord, RecordKind, SlabStackRecord, VmaRecord,
    FAULT_BATCH,
};

#[derive(Clone, Copy, Debug)]
pub enum Record<'a> {
    /// A fault, and the raw bytes of the frames that follow it (`n_user` user frames, then
    /// `n_kernel` kernel frames, native-endian u64s); empty unless its stacks were walked.
    Fault(FaultRecord, &'a [u8]),
    /// A CPU's batch of fault records without frames: the bytes of its valid records.
    FaultBatch(&'a [u8]),
    /// A VMA change, and the bytes that follow it: `stack_copy` bytes of user stack, then the
    /// `n_user` user frames (see [`vma_parts`]).
    Vma(VmaRecord, &'a [u8]),
    Proc(ProcRecord),
    SlabStack(SlabStackRecord),
}

impl Record<'_> {
    /// When the kernel emitted it (`CLOCK_MONOTONIC`, ns).
    pub fn time_ns(&self) -> u64 {
        match self {
            Record::Fault(f, _) => f.time_ns,
            Record::FaultBatch(records) => batch_records(records).last().map_or(0, |f| f.time_ns),
            Record::Vma(v, _) => v.time_ns,
            Record::Proc(p) => p.time_ns,
            Record::SlabStack(s) => s.time_ns,
        }
    }
}

/// When the record in `bytes` was emitted, read without decoding the rest.
pub fn time_of(bytes: &[u8]) -> Option<u64> {
    use std::mem::offset_of;
    let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    let at = match RecordKind::from_u32(tag)? {
        // The newest of the batch: the side-band must be read up to it.
        RecordKind::FaultBatch => {
            let count = u32::from_ne_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
            let last = count.checked_sub(1)?.min(FAULT_BATCH - 1);
            offset_of!(FaultBatch, records)
                + last * std::mem::size_of::<BatchedFault>()
                + offset_of!(BatchedFault, time_ns)
        }
        RecordKind::Fault => offset_of!(FaultRecord, time_ns),
        RecordKind::Vma => offset_of!(VmaRecord, time_ns),
        RecordKind::Proc => offset_of!(ProcRecord, time_ns),
        RecordKind::SlabStack => offset_of!(SlabStackRecord, time_ns),
    };
    Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes `bytes` (frames following a fault record) into `out`, replacing its contents.
pub fn frames_into(bytes: &[u8], out: &mut Vec<u64>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_ne_bytes)),
    );
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
pub fn decode(bytes: &[u8]) -> Option<Record<'_>> {
    let tag = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match RecordKind::from_u32(tag)? {
        RecordKind::Fault => {
            let rec: FaultRecord = read(bytes)?;
            let header = std::mem::size_of::<FaultRecord>();
            let n = (rec.n_user as usize).checked_add(rec.n_kernel as usize)?;
            let frames = bytes.get(header..header.checked_add(n.checked_mul(8)?)?)?;
            Some(Record::Fault(rec, frames))
        }
        RecordKind::Vma => {
            let rec: VmaRecord = read(bytes)?;
            let header = std::mem::size_of::<VmaRecord>();
            let len = (rec.stack_copy as usize).checked_add(usize::from(rec.n_user) * 8)?;
            let rest = bytes.get(header..header.checked_add(len)?)?;
            Some(Record::Vma(rec, rest))
        }
        RecordKind::FaultBatch => {
            let count = u32::from_ne_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
            if count > FAULT_BATCH {
                return None;
            }
            let from = std::mem::offset_of!(FaultBatch, records);
            let len = count * std::mem::size_of::<BatchedFault>();
            bytes.get(from..from + len).map(Record::FaultBatch)
        }
        RecordKind::Proc => read(bytes).map(Record::Proc),
        RecordKind::SlabStack => read(bytes).map(Record::SlabStack),
    }
}

/// The fault records of a batch's bytes ([`Record::FaultBatch`]).
pub fn batch_records(bytes: &[u8]) -> impl Iterator<Item = BatchedFault> + '_ {
    bytes
        .chunks_exact(std::mem::size_of::<BatchedFault>())
        .filter_map(read::<BatchedFault>)
}

/// The stack copy and the frame bytes of a VMA record's trailing bytes.
pub fn vma_parts<'a>(rec: &VmaRecord, rest: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    rest.split_at((rec.stack_copy as usize).min(rest.len()))
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
            Some(Record::Fault(r, frames)) => {
                assert_eq!((r.pid, r.address, frames.len()), (5, 0x1234, 0))
            }
            other => panic!("{other:?}"),
        }
        // A walked fault: its frames follow the header.
        let walked = FaultRecord {
            n_user: 2,
            n_kernel: 1,
            ..f
        };
        let mut bytes = bytes_of(&walked);
        for ip in [0x10u64, 0x20, 0xffff_ffff_8100_0000] {
            bytes.extend_from_slice(&ip.to_ne_bytes());
        }
        let Some(Record::Fault(_, frames)) = decode(&bytes) else {
            panic!("walked fault not decoded");
        };
        let mut ips = Vec::new();
        frames_into(frames, &mut ips);
        assert_eq!(ips, vec![0x10, 0x20, 0xffff_ffff_8100_0000]);
        assert!(
            decode(&bytes[..bytes.len() - 8]).is_none(),
            "frames cut short"
        );
        let v = VmaRecord {
            kind: RecordKind::Vma as u32,
            len: 8192,
            ..Default::default()
        };
        assert!(
            matches!(decode(&bytes_of(&v)), Some(Record::Vma(r, f)) if r.len == 8192 && f.is_empty())
        );
        let with_stack = VmaRecord { n_user: 2, ..v };
        let mut bytes = bytes_of(&with_stack);
        bytes.extend_from_slice(&0x10u64.to_ne_bytes());
        assert!(decode(&bytes).is_none(), "frames cut short");
        bytes.extend_from_slice(&0x20u64.to_ne_bytes());
        assert!(matches!(decode(&bytes), Some(Record::Vma(_, f)) if f.len() == 16));
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
