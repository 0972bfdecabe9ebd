//! Workloads with known slab behaviour: objects held and released, a steady leak, churn.
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::report;

fn pipe() -> Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    Ok(fds)
}

fn eventfd() -> Result<libc::c_int> {
    // SAFETY: eventfd takes an initial value and flags by value.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        bail!("eventfd: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn close(fd: libc::c_int) {
    // SAFETY: a descriptor this process opened and closes once.
    unsafe { libc::close(fd) };
}

fn raise_fd_limit(n: usize) {
    let want = (n as u64 * 2 + 64).max(1024);
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: a valid rlimit by pointer; failing leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// Opens `n` pipes (or eventfds), holds them `hold_ms`, closes them, waits `after_ms`.
pub fn hold(kind: &str, n: usize, hold_ms: u64, after_ms: u64) -> Result<()> {
    raise_fd_limit(n);
    let mut fds = Vec::with_capacity(2 * n);
    for _ in 0..n {
        match kind {
            "pipes" => fds.extend(pipe()?),
            _ => fds.push(eventfd()?),
        }
    }
    report(&format!("phase=held objects={n}"))?;
    std::thread::sleep(Duration::from_millis(hold_ms));
    for fd in fds {
        close(fd);
    }
    report("phase=closed")?;
    std::thread::sleep(Duration::from_millis(after_ms));
    Ok(())
}

/// Keeps one more eventfd every `period_ms` for `duration_ms`: a steady kernel-memory leak.
pub fn leak(period_ms: u64, duration_ms: u64) -> Result<()> {
    raise_fd_limit((duration_ms / period_ms.max(1)) as usize);
    let end = Instant::now() + Duration::from_millis(duration_ms);
    let mut held = Vec::new();
    while Instant::now() < end {
        held.push(eventfd()?);
        std::thread::sleep(Duration::from_millis(period_ms));
    }
    report(&format!("leaked={}", held.len()))
}

/// Creates and closes pipes as fast as it can for `duration_ms`, passing `bytes` through each
/// one first (0: none); prints how many per second.
pub fn pipe_churn(duration_ms: u64, bytes: usize) -> Result<()> {
    let start = Instant::now();
    let end = start + Duration::from_millis(duration_ms);
    let mut n = 0u64;
    let mut buf = vec![7u8; bytes.min(60 << 10)];
    while Instant::now() < end {
        for _ in 0..64 {
            let [r, w] = pipe()?;
            if !buf.is_empty() {
                // SAFETY: `buf` is valid for its length; less than a pipe's capacity, so the
                // write completes without a reader.
                let wrote = unsafe { libc::write(w, buf.as_ptr().cast(), buf.len()) };
                // SAFETY: as above, into `buf`.
                let read = unsafe { libc::read(r, buf.as_mut_ptr().cast(), buf.len()) };
                if wrote < 0 || read < 0 {
                    bail!("pipe I/O: {}", std::io::Error::last_os_error());
                }
            }
            close(r);
            close(w);
        }
        n += 64;
    }
    let secs = start.elapsed().as_secs_f64();
    report(&format!("pipes={n} pipes_per_s={:.0}", n as f64 / secs))
}

/// Maps and unmaps small regions for `duration_ms`: maple-tree nodes through the sheaf path.
pub fn mmap_churn(duration_ms: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_millis(duration_ms);
    let mut n = 0u64;
    while Instant::now() < end {
        let mut maps = Vec::with_capacity(64);
        for i in 0..64 {
            // Alternate protections so neighbouring regions do not merge into one VMA.
            let prot = if i % 2 == 0 {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                bail!("mmap: {}", std::io::Error::last_os_error());
            }
            maps.push(p);
        }
        for p in maps {
            // SAFETY: unmaps a region this loop mapped, once.
            unsafe { libc::munmap(p, 4096) };
        }
        n += 64;
    }
    report(&format!("mappings={n}"))
}

/// Creates `n` empty files in a new directory `dir`, holds them `hold_ms`, removes them: a
/// dentry, an inode and their security blobs each, held without a descriptor.
pub fn files(dir: &str, n: usize, hold_ms: u64) -> Result<()> {
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        std::fs::File::create(dir.join(i.to_string()))?;
    }
    report(&format!("phase=held files={n}"))?;
    std::thread::sleep(Duration::from_millis(hold_ms));
    std::fs::remove_dir_all(dir)?;
    report("phase=removed")
}
