//! Reading the outstanding-object table in bulk: `BPF_MAP_LOOKUP_BATCH` copies a few hundred
//! buckets (eight objects each) of keys, then of records, per pair of system calls, where one
//! lookup per bucket would take seconds for a million objects.
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::maps::MapData;
use memtrace_common::{SlabAlloc, SlabBucket, SlabRecords};

use crate::Error;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Buckets asked for per call (16 KiB of keys, 128 KiB of records).
const BATCH: usize = 256;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads up to `values.len()` entries of array map `fd` after index `after` (from the start
/// for `None`) into `indices` and `values`; returns how many, 0 at the end.
fn read_batch<T>(
    fd: RawFd,
    after: Option<u32>,
    indices: &mut [u32],
    values: &mut [T],
) -> Result<usize, Error> {
    let token_in = after.unwrap_or(0);
    let mut token_out = 0u32;
    let mut attr = BatchAttr {
        in_batch: if after.is_some() {
            &token_in as *const u32 as u64
        } else {
            0
        },
        out_batch: &mut token_out as *mut u32 as u64,
        keys: indices.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: values.len().min(indices.len()) as u32,
        map_fd: fd as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid batch attr whose buffers hold `count` u32 keys and `count`
    // values of type T, which callers pass as the map's value type (the kernel program
    // defines SLAB_KEYS and SLAB_RECORDS with these types); the tokens are u32s like the
    // array's keys.
    let done = unsafe { crate::loader::bpf_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr) };
    let n = (attr.count as usize).min(values.len());
    if let Err(e) = done {
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(Error::Map(format!(
                "reading the outstanding-object table (BPF_MAP_LOOKUP_BATCH): {e}"
            )));
        }
    }
    Ok(n)
}

/// Calls `each(address, allocation)` for every object in the table. The table changes while
/// it is read: an object added or removed meanwhile may be seen or not, and one added between
/// the read of its key and of its record may come with the record of the way's previous
/// object (the next report has it right).
pub fn for_each(
    keys_map: &MapData,
    records_map: &MapData,
    mut each: impl FnMut(u64, &SlabAlloc),
) -> Result<(), Error> {
    let keys_fd = keys_map.fd().as_fd().as_raw_fd();
    let records_fd = records_map.fd().as_fd().as_raw_fd();
    let mut indices = vec![0u32; BATCH];
    let mut record_indices = vec![0u32; BATCH];
    let mut keys = vec![SlabBucket::default(); BATCH];
    let mut records = vec![SlabRecords::default(); BATCH];
    let mut after = None;
    loop {
        let n = read_batch(keys_fd, after, &mut indices, &mut keys)?;
        if n == 0 {
            return Ok(());
        }
        // The records of the same buckets: the arrays have the same length.
        let m = read_batch(records_fd, after, &mut record_indices, &mut records[..n])?;
        for i in 0..n.min(m) {
            if indices[i] != record_indices[i] {
                continue;
            }
            for (key, alloc) in keys[i].keys.iter().zip(&records[i].allocs) {
                if *key != 0 {
                    each(*key, alloc);
                }
            }
        }
        after = Some(indices[n - 1]);
    }
}
