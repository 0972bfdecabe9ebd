//! Workloads with known process memory: each kind of memory touched to a known size, a steady
//! user-space leak, and a workload of constant size that churns.
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::{cold_file, map_anon, map_file, report, touch_pages_read, touch_pages_write, PAGE};

/// Touches `anon` pages of private anonymous memory, `shm` pages of shared anonymous memory
/// and `file_pages` of a private mapping of the file `path` (created), then holds them
/// `hold_ms`.
pub fn kinds(anon: usize, shm: usize, path: &str, file_pages: usize, hold_ms: u64) -> Result<()> {
    // A kind of 0 pages is left out (mmap takes no empty mapping).
    if anon > 0 {
        touch_pages_write(map_anon(anon * PAGE, false)?, anon);
    }
    if shm > 0 {
        touch_pages_write(map_anon(shm * PAGE, true)?, shm);
    }
    let _file = if file_pages > 0 {
        let f = cold_file(path, file_pages)?;
        touch_pages_read(
            map_file(&f, file_pages * PAGE, libc::PROT_READ)?,
            file_pages,
        );
        Some(f)
    } else {
        None
    };
    report(&format!(
        "phase=ready anon_bytes={} shm_bytes={} file_bytes={}",
        anon * PAGE,
        shm * PAGE,
        file_pages * PAGE
    ))?;
    std::thread::sleep(Duration::from_millis(hold_ms));
    Ok(())
}

/// One more buffer of `bytes`, touched and never freed.
#[inline(never)]
fn leak_chunk(bytes: usize) -> usize {
    let chunk = vec![0x6bu8; bytes];
    let len = chunk.len();
    std::mem::forget(std::hint::black_box(chunk));
    len
}

/// Leaks `bytes_per_s` of heap, a tenth every 100 ms, for `duration_ms`.
pub fn leak(bytes_per_s: usize, duration_ms: u64) -> Result<()> {
    let start = Instant::now();
    let mut leaked = 0;
    let mut tick = 0u32;
    while start.elapsed() < Duration::from_millis(duration_ms) {
        leaked += leak_chunk(bytes_per_s / 10);
        tick += 1;
        // On a fixed schedule, so the rate holds however long a chunk takes.
        let next = Duration::from_millis(100) * tick;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    report(&format!("leaked_bytes={leaked}"))
}

/// Holds `bytes` of heap in ten buffers and, every 100 ms for `duration_ms`, frees one and
/// allocates it again: busy, constant in size.
pub fn steady(bytes: usize, duration_ms: u64) -> Result<()> {
    let start = Instant::now();
    let mut buffers: Vec<Vec<u8>> = (0..10).map(|_| vec![0x5au8; bytes / 10]).collect();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(duration_ms) {
        buffers[i % 10] = Vec::new();
        buffers[i % 10] = vec![i as u8; bytes / 10];
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    report(&format!(
        "held_bytes={}",
        buffers.iter().map(Vec::len).sum::<usize>()
    ))
}

/// Maps `n` private anonymous regions of `pages` pages, touching the first page of each.
#[inline(never)]
fn map_regions(n: usize, pages: usize) -> Result<Vec<*mut u8>> {
    let mut regions = Vec::with_capacity(n);
    for _ in 0..n {
        let p = map_anon(pages * PAGE, false)?;
        touch_pages_write(p, 1);
        regions.push(p);
    }
    Ok(regions)
}

/// `n` regions of `pages` pages mapped by `map_regions`; `unmap` 0 keeps them, 1 unmaps them,
/// 2 unmaps the second half of each. Then holds `hold_ms`.
pub fn regions(n: usize, pages: usize, unmap: usize, hold_ms: u64) -> Result<()> {
    let regions = map_regions(n, pages)?;
    for &p in &regions {
        let (at, len) = match unmap {
            1 => (0, pages),
            2 => (pages / 2, pages - pages / 2),
            _ => continue,
        };
        // SAFETY: a part of a region this workload mapped and no longer uses.
        if unsafe { libc::munmap(p.add(at * PAGE).cast(), len * PAGE) } != 0 {
            anyhow::bail!("munmap: {}", std::io::Error::last_os_error());
        }
    }
    report(&format!("regions={n} pages={pages}"))?;
    std::thread::sleep(Duration::from_millis(hold_ms));
    Ok(())
}

/// malloc and free blocks of `bytes` (touching one byte of each) for `duration_ms`, with
/// glibc's mmap threshold fixed at 128 KiB so each large block is its own mmap and munmap
/// (as it is until glibc's dynamic threshold adapts); prints how many per second.
pub fn malloc_large(duration_ms: u64, bytes: usize) -> Result<()> {
    // SAFETY: mallopt takes two integers; a fixed threshold also stops the adjustment.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let start = Instant::now();
    let end = start + Duration::from_millis(duration_ms);
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            // SAFETY: malloc/free of a block used only here; a null result is checked.
            unsafe {
                let p = libc::malloc(bytes).cast::<u8>();
                if p.is_null() {
                    anyhow::bail!("malloc failed");
                }
                std::ptr::write_volatile(p, 1);
                libc::free(p.cast());
            }
        }
        n += 64;
    }
    let secs = start.elapsed().as_secs_f64();
    report(&format!("blocks={n} blocks_per_s={:.0}", n as f64 / secs))
}

/// One more private anonymous region of `bytes`, mapped and never touched or unmapped.
#[inline(never)]
fn reserve_chunk(bytes: usize) -> Result<usize> {
    map_anon(bytes, false)?;
    Ok(bytes)
}

/// Reserves `bytes_per_s` of address space, a tenth every 100 ms, for `duration_ms`,
/// touching none of it: VIRT grows, RES does not.
pub fn reserve(bytes_per_s: usize, duration_ms: u64) -> Result<()> {
    let start = Instant::now();
    let mut reserved = 0;
    let mut tick = 0u32;
    while start.elapsed() < Duration::from_millis(duration_ms) {
        // Whole pages, so each region is what it says.
        reserved += reserve_chunk((bytes_per_s / 10).div_ceil(PAGE) * PAGE)?;
        tick += 1;
        let next = Duration::from_millis(100) * tick;
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    report(&format!("reserved_bytes={reserved}"))
}
