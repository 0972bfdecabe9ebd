//! Reading the outstanding-object map in bulk: `BPF_MAP_LOOKUP_BATCH` copies thousands of
//! entries per system call, where aya's iterator takes two calls per entry (a million
//! outstanding objects would take seconds).
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::maps::MapData;
use memtrace_common::SlabAlloc;

use crate::Error;

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const BATCH: usize = 8192;

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

/// Calls `each(address, allocation)` for every entry of the outstanding map. The map changes
/// while it is read: an entry added or removed meanwhile may be seen or not, never torn.
pub fn for_each(map: &MapData, mut each: impl FnMut(u64, &SlabAlloc)) -> Result<(), Error> {
    let fd: RawFd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u64; BATCH];
    let mut values = vec![SlabAlloc::default(); BATCH];
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid batch attr whose buffers hold `count` keys and values of
        // the map's key and value sizes (u64 and SlabAlloc, as the kernel program defines
        // them), and the batch tokens are u64s, at least the hash map's u32 bucket index.
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
        for i in 0..n {
            each(keys[i], &values[i]);
        }
        match err {
            None => {}
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Some(e) => {
                return Err(Error::Map(format!(
                    "reading the outstanding-object map (BPF_MAP_LOOKUP_BATCH): {e}"
                )))
            }
        }
        token_in = token_out;
        first = false;
    }
}
