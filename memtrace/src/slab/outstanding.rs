//! Reading the outstanding-object table in bulk: `BPF_MAP_LOOKUP_BATCH` copies hundreds of
//! buckets (eight objects each) per system call, where one lookup per bucket would take
//! seconds for a million objects.
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::maps::MapData;
use memtrace_common::{SlabAlloc, SlabBucket};

use crate::Error;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Buckets asked for per call (about 150 KB).
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

/// Calls `each(address, allocation)` for every object in the table. The table changes while
/// it is read: an object added or removed meanwhile may be seen or not.
pub fn for_each(table: &MapData, mut each: impl FnMut(u64, &SlabAlloc)) -> Result<(), Error> {
    let fd: RawFd = table.fd().as_fd().as_raw_fd();
    // Array keys are u32 indices; the batch tokens are the last index read.
    let mut indices = vec![0u32; BATCH];
    let mut buckets = vec![SlabBucket::default(); BATCH];
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: indices.as_mut_ptr() as u64,
            values: buckets.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid batch attr whose buffers hold `count` keys and values of
        // the map's key and value sizes (u32 and SlabBucket, as the kernel program defines
        // them), and the tokens are u32s like the array's keys.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(BATCH);
        for bucket in &buckets[..n] {
            for (key, alloc) in bucket.keys.iter().zip(&bucket.allocs) {
                if *key != 0 {
                    each(*key, alloc);
                }
            }
        }
        match err {
            None if n == 0 => return Ok(()),
            None => {}
            // The end of the table.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => {
                return Err(Error::Map(format!(
                    "reading the outstanding-object table (BPF_MAP_LOOKUP_BATCH): {e}"
                )))
            }
        }
        token_in = token_out;
        first = false;
    }
}
