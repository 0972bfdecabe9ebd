//! The reading side of the BPF ring buffer that carries every record, with its data pages
//! mapped once.
//!
//! The kernel lets a reader map the data pages twice in a row, so a record that wraps around
//! the end reads as one slice; that is what aya's `RingBuf` and libbpf do. Each mapping counts
//! in the reader's RSS, though: a 16 MiB ring costs 32 MiB, a fifth of what the agent may use on
//! a busy host. Here the data is mapped once and the rare record that wraps is copied into a
//! buffer. The protocol is the kernel's (`kernel/bpf/ringbuf.c`): an 8-byte header per record
//! whose length word carries a busy and a discard bit, positions that only grow, the consumer
//! position published with release ordering after a record is read.
use std::{
    ops::Deref,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{self, AtomicU32, AtomicUsize, Ordering},
};

use aya::maps::MapData;

use crate::Error;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// A shared mapping of part of the ring map, unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> Result<Self, Error> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| Error::Map("ring buffer offset out of range".into()))?;
        // SAFETY: a fresh shared mapping of the ring map's fd, at an address the kernel picks;
        // nothing else refers to that memory until this returns.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map(format!(
                "mapping the ring buffer: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::Map("mapping the ring buffer: null mapping".into()))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no reference into the mapping
        // outlives the `Ring` that owns it (items borrow the ring).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The ring buffer map, mapped for reading. Only one [`RingItem`] is out at a time.
pub struct Ring {
    /// Keeps the map (and its fd) alive as long as the mappings.
    map: MapData,
    /// The consumer position page (read-write).
    consumer_page: Mapping,
    /// The producer position page, then the data pages once (read-only).
    producer: Mapping,
    /// Data bytes (a power of two).
    size: usize,
    consumer_pos: usize,
    producer_pos: usize,
    /// Whether the consumer position moved since the producer position was last read: the
    /// kernel then decides from it whether to wake us, so a fence must order the two.
    needs_fence: bool,
    /// Where a record that wraps around the end is put together.
    wrapped: Vec<u8>,
}

// SAFETY: the mappings are plain shared memory owned by the ring; moving the ring to another
// thread moves that ownership with it.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(map: MapData) -> Result<Self, Error> {
        let info = map
            .info()
            .map_err(|e| Error::Map(format!("reading the ring buffer's size: {e}")))?;
        let size = usize::try_from(info.max_entries())
            .map_err(|_| Error::Map("ring buffer size out of range".into()))?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| Error::Map("page size unknown".into()))?;
        if !size.is_power_of_two() || size < page {
            return Err(Error::Map(format!("ring buffer of {size} bytes")));
        }
        let fd = map.fd().as_fd();
        let consumer_page = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer_page,
            producer,
            size,
            consumer_pos: 0,
            producer_pos: 0,
            needs_fence: false,
            wrapped: Vec::new(),
        };
        ring.consumer_pos = ring.consumer_atomic().load(Ordering::Acquire);
        ring.producer_pos = ring.producer_atomic().load(Ordering::Acquire);
        Ok(ring)
    }

    fn consumer_atomic(&self) -> &AtomicUsize {
        // SAFETY: the consumer page is mapped read-write for the ring's lifetime, page-aligned,
        // and the kernel keeps the consumer position in its first word.
        unsafe { self.consumer_page.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_atomic(&self) -> &AtomicUsize {
        // SAFETY: as above for the producer page (read-only: only loaded).
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    /// The data pages' first byte. No slice covers them whole: the kernel writes into the
    /// free part and into records not committed yet while we read.
    fn data_ptr(&self) -> *const u8 {
        let page = self.producer.len - self.size;
        // SAFETY: `page` is within the mapping (`page + size` bytes long).
        unsafe { self.producer.ptr.as_ptr().add(page) }
    }

    /// `len` bytes of a committed record's data at `start` (`start + len <= size`).
    fn committed(&self, start: usize, len: usize) -> &[u8] {
        debug_assert!(start + len <= self.size);
        // SAFETY: in bounds of the data pages (checked by the callers against `size`); the
        // record's busy bit was seen clear with acquire ordering, so the kernel no longer
        // writes these bytes until the consumer position passes them, which happens only
        // after the borrow ends (the item holds `&mut Ring`).
        unsafe { std::slice::from_raw_parts(self.data_ptr().add(start), len) }
    }

    fn consume(&mut self, len: usize) {
        self.consumer_pos += (HEADER_BYTES + len).next_multiple_of(8);
        // The kernel pairs this with an acquire load before it reuses the record's bytes.
        self.consumer_atomic()
            .store(self.consumer_pos, Ordering::Release);
        self.needs_fence = true;
    }

    /// The next record, or `None` when the ring is empty (or the next one is still being
    /// written).
    // Not an `Iterator`: the item borrows the ring, and moves it on when dropped.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<RingItem<'_>> {
        loop {
            if self.consumer_pos == self.producer_pos {
                if self.needs_fence {
                    // Either this sees a new record, or its producer sees the new consumer
                    // position and wakes us.
                    atomic::fence(Ordering::SeqCst);
                    self.needs_fence = false;
                }
                self.producer_pos = self.producer_atomic().load(Ordering::Acquire);
                if self.consumer_pos == self.producer_pos {
                    return None;
                }
            }
            let mask = self.size - 1;
            let offset = self.consumer_pos & mask;
            // Headers are 8-byte aligned and the size a multiple of the page: a header never
            // wraps.
            // SAFETY: 4 in-bounds bytes (offset <= size - 8) at an 8-aligned offset of the
            // mapping, only ever accessed atomically; the kernel commits a record by clearing
            // the busy bit with a fully ordered xchg, paired with this load.
            let header = unsafe { &*self.data_ptr().add(offset).cast::<AtomicU32>() }
                .load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                if !self.needs_fence {
                    return None;
                }
                atomic::fence(Ordering::SeqCst);
                self.needs_fence = false;
                continue;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if header & DISCARD_BIT != 0 {
                self.consume(len);
                continue;
            }
            if len > self.size - HEADER_BYTES {
                // Not a record the kernel could have written: skip what is there rather than
                // read past the mapping.
                self.consumer_pos = self.producer_pos;
                self.consumer_atomic()
                    .store(self.consumer_pos, Ordering::Release);
                self.needs_fence = true;
                return None;
            }
            let start = (offset + HEADER_BYTES) & mask;
            let wraps = start + len > self.size;
            if wraps {
                let first = self.size - start;
                let mut wrapped = std::mem::take(&mut self.wrapped);
                wrapped.clear();
                wrapped.extend_from_slice(self.committed(start, first));
                wrapped.extend_from_slice(self.committed(0, len - first));
                self.wrapped = wrapped;
            }
            return Some(RingItem {
                ring: self,
                start,
                len,
                wraps,
            });
        }
    }
}

impl AsFd for Ring {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// One record; the ring moves past it when this is dropped.
pub struct RingItem<'a> {
    ring: &'a mut Ring,
    start: usize,
    len: usize,
    wraps: bool,
}

impl Deref for RingItem<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        if self.wraps {
            &self.ring.wrapped
        } else {
            self.ring.committed(self.start, self.len)
        }
    }
}

impl Drop for RingItem<'_> {
    fn drop(&mut self) {
        self.ring.consume(self.len);
    }
}
