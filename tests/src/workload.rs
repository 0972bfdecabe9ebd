//! Workloads with known fault behaviour, for memtrace's integration tests, benchmark and demo.
//!
//! Each prints one line `key=value ...` at the end with the kernel's own counts for this process
//! (`/proc/self/stat` minflt/majflt, read just before exit), so a test can compare memtrace's
//! numbers with the kernel's.
use std::{
    io::{BufRead as _, Write as _},
    ptr,
};

use anyhow::{bail, Context as _, Result};

mod mem_workloads;
mod slab_workloads;

const PAGE: usize = 4096;

/// (minflt, majflt) of this process from /proc/self/stat.
fn own_faults() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(") ").context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(0) ppid pgrp session tty tpgid flags minflt(7) cminflt majflt(9).
    Ok((f[7].parse()?, f[9].parse()?))
}

pub(crate) fn report(extra: &str) -> Result<()> {
    let (minflt, majflt) = own_faults()?;
    println!(
        "pid={} minflt={minflt} majflt={majflt} {extra}",
        std::process::id()
    );
    std::io::stdout().flush()?;
    Ok(())
}

/// Maps `len` bytes of anonymous memory.
fn map_anon(len: usize, shared: bool) -> Result<*mut u8> {
    let flags = libc::MAP_ANONYMOUS
        | if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Writes one byte to each page: one minor fault per page on fresh anonymous memory.
#[inline(never)]
fn touch_pages_write(base: *mut u8, pages: usize) {
    for i in 0..pages {
        // SAFETY: callers pass a mapping of at least `pages` writable pages.
        unsafe { ptr::write_volatile(base.add(i * PAGE), i as u8) };
    }
}

/// Reads one byte of each page.
#[inline(never)]
fn touch_pages_read(base: *const u8, pages: usize) -> u64 {
    let mut sum = 0u64;
    for i in 0..pages {
        // SAFETY: callers pass a mapping of at least `pages` readable pages.
        sum += unsafe { ptr::read_volatile(base.add(i * PAGE)) } as u64;
    }
    sum
}

fn anon(pages: usize) -> Result<()> {
    let base = map_anon(pages * PAGE, false)?;
    let start = std::time::Instant::now();
    touch_pages_write(base, pages);
    let touch_ns = start.elapsed().as_nanos();
    report(&format!("pages={pages} touch_ns={touch_ns}"))
}

fn heap(pages: usize) -> Result<()> {
    // A Vec's buffer: malloc'd, so brk heap or an mmap'd chunk depending on size.
    let mut v: Vec<u8> = Vec::with_capacity(pages * PAGE);
    touch_pages_write(v.as_mut_ptr(), pages);
    // SAFETY: every page was written above; the rest stays uninitialised and unread.
    unsafe { v.set_len(1) };
    report(&format!("pages={pages}"))
}

/// Creates a file of `pages` pages on disk and drops it from the page cache.
fn cold_file(path: &str, pages: usize) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {path}"))?;
    let chunk = vec![0x5au8; 256 * PAGE];
    let mut left = pages * PAGE;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()?;
    // SAFETY: plain syscalls on an fd we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(f)
}

fn map_file(f: &std::fs::File, len: usize, prot: i32) -> Result<*mut u8> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: maps a file we own; the mapping is only accessed within `len`.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap file: {}", std::io::Error::last_os_error());
    }
    // SAFETY: advice on the mapping just created; random access disables readahead so each
    // page read is its own major fault.
    unsafe { libc::madvise(p, len, libc::MADV_RANDOM) };
    Ok(p.cast())
}

fn file(path: &str, pages: usize) -> Result<()> {
    let f = cold_file(path, pages)?;
    let base = map_file(&f, pages * PAGE, libc::PROT_READ)?;
    let sum = touch_pages_read(base, pages);
    report(&format!("pages={pages} sum={sum}"))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Copy-on-write: read every page of a private file mapping (maps the page-cache page
/// read-only), then write every page (a protection fault that copies it).
fn cow(path: &str, pages: usize) -> Result<()> {
    let f = cold_file(path, pages)?;
    let base = map_file(&f, pages * PAGE, libc::PROT_READ | libc::PROT_WRITE)?;
    touch_pages_read(base, pages);
    touch_pages_write(base, pages);
    report(&format!("pages={pages}"))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn threads(n: usize, pages: usize) -> Result<()> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || -> Result<()> {
                let base = map_anon(pages * PAGE, false)?;
                touch_pages_write(base, pages);
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
    }
    report(&format!("threads={n} pages={pages}"))
}

/// Forks `n` children that each touch `pages` anonymous pages and exit.
fn forks(n: usize, pages: usize) -> Result<()> {
    for _ in 0..n {
        // SAFETY: the child only touches memory and exits with _exit.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                let code = match map_anon(pages * PAGE, false) {
                    Ok(base) => {
                        touch_pages_write(base, pages);
                        0
                    }
                    Err(_) => 1,
                };
                // SAFETY: leave the child without running the parent's destructors.
                unsafe { libc::_exit(code) };
            }
            _ => {}
        }
    }
    for _ in 0..n {
        // SAFETY: reaps any child.
        unsafe { libc::wait(ptr::null_mut()) };
    }
    report(&format!("forks={n} pages={pages}"))
}

/// Waits for a line on stdin, then touches pages: lets a test attach with -p first.
fn wait_then_anon(pages: usize) -> Result<()> {
    println!("ready pid={}", std::process::id());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let before = own_faults()?;
    let base = map_anon(pages * PAGE, false)?;
    touch_pages_write(base, pages);
    let after = own_faults()?;
    report(&format!(
        "pages={pages} delta_minflt={}",
        after.0 - before.0
    ))
}

/// Sleeps, touching nothing (for "pid exits mid-run" checks).
fn sleep_ms(ms: u64) -> Result<()> {
    std::thread::sleep(std::time::Duration::from_millis(ms));
    report("")
}

/// A small tour of memory kinds: heap, private file (major faults), shared memory, a child.
fn demo(dir: &str) -> Result<()> {
    let step = std::time::Duration::from_millis(200);
    heap_phase(8192)?;
    std::thread::sleep(step);
    let path = format!("{dir}/memtrace-demo.dat");
    let f = cold_file(&path, 2048)?;
    let base = map_file(&f, 2048 * PAGE, libc::PROT_READ)?;
    read_config_file(base, 2048);
    let _ = std::fs::remove_file(&path);
    std::thread::sleep(step);
    let shm = map_anon(4096 * PAGE, true)?;
    fill_shared_buffer(shm, 4096);
    std::thread::sleep(step);
    forks(2, 1024)?;
    Ok(())
}

#[inline(never)]
fn heap_phase(pages: usize) -> Result<()> {
    let mut v: Vec<u8> = Vec::with_capacity(pages * PAGE);
    touch_pages_write(v.as_mut_ptr(), pages);
    // SAFETY: the first byte was written above.
    unsafe { v.set_len(1) };
    std::hint::black_box(&v);
    Ok(())
}

#[inline(never)]
fn read_config_file(base: *const u8, pages: usize) -> u64 {
    touch_pages_read(base, pages)
}

#[inline(never)]
fn fill_shared_buffer(base: *mut u8, pages: usize) {
    touch_pages_write(base, pages)
}

/// First-touches `pages` pages in total through one 64 MiB window, dropping it with
/// MADV_DONTNEED between rounds: the page allocator hands the same, already host-backed pages
/// back each round, so a fault costs the same in every run (the cheapest fault there is, and
/// the hardest case for a tracer's relative overhead).
fn anon_recycle(pages: usize) -> Result<()> {
    const WINDOW: usize = 16 * 1024;
    let base = map_anon(WINDOW * PAGE, false)?;
    let mut touch_ns = 0;
    let mut left = pages;
    while left > 0 {
        let n = left.min(WINDOW);
        let start = std::time::Instant::now();
        touch_pages_write(base, n);
        touch_ns += start.elapsed().as_nanos();
        // SAFETY: drops the contents of our own private anonymous mapping; nothing borrows it.
        if unsafe { libc::madvise(base.cast(), WINDOW * PAGE, libc::MADV_DONTNEED) } != 0 {
            bail!("madvise: {}", std::io::Error::last_os_error());
        }
        left -= n;
    }
    report(&format!("pages={pages} touch_ns={touch_ns}"))
}

/// Lets the kernel first-touch `pages` fresh anonymous pages: read(2) from /dev/zero into them,
/// so every fault is taken in kernel mode (on the user buffer, inside the copy-out).
#[inline(never)]
fn read_zero_into(base: *mut u8, len: usize) -> Result<()> {
    use std::io::Read as _;
    let mut zero = std::fs::File::open("/dev/zero").context("open /dev/zero")?;
    // SAFETY: `base` is a fresh private mapping of `len` bytes that nothing else refers to.
    let buf = unsafe { std::slice::from_raw_parts_mut(base, len) };
    zero.read_exact(buf).context("read /dev/zero")
}

fn kernel_touch(pages: usize) -> Result<()> {
    let base = map_anon(pages * PAGE, false)?;
    read_zero_into(base, pages * PAGE)?;
    report(&format!("pages={pages}"))
}

/// Touches `pages` fresh pages, and asks the kernel `failed` times to copy into a page it may
/// not write (read(2) from /dev/zero into PROT_NONE memory): each is a page fault the kernel
/// fails (EFAULT) and never counts.
fn failed_faults(failed: usize, pages: usize) -> Result<()> {
    touch_pages_write(map_anon(pages * PAGE, false)?, pages);
    let guard = map_anon(PAGE, false)?;
    // SAFETY: `guard` is a page of our own mapping; no access to it follows.
    if unsafe { libc::mprotect(guard.cast(), PAGE, libc::PROT_NONE) } != 0 {
        bail!("mprotect: {}", std::io::Error::last_os_error());
    }
    let zero = std::fs::File::open("/dev/zero")?;
    let mut efault = 0;
    for _ in 0..failed {
        use std::os::fd::AsRawFd as _;
        // SAFETY: the kernel checks the destination and fails with EFAULT; nothing is written.
        let n = unsafe { libc::read(zero.as_raw_fd(), guard.cast(), 64) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT) {
            efault += 1;
        }
    }
    report(&format!("pages={pages} efault={efault}"))
}

/// Maps `pages` pages with MAP_POPULATE (the kernel faults them in itself, counting minor
/// faults for this thread with no page-fault exception), then touches `pages` fresh pages.
fn populate(pages: usize) -> Result<()> {
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    touch_pages_write(map_anon(pages * PAGE, false)?, pages);
    report(&format!("pages={pages}"))
}

/// Two callers of the same touch loop, called one after the other from the same function:
/// their frames sit at the same stack addresses, so only the return address tells their
/// faults apart (the case the stack cache's periodic check exists for).
fn two_callers(pages: usize) -> Result<()> {
    first_caller(pages)?;
    second_caller(pages)?;
    report(&format!("pages={pages}"))
}

// The constants keep the two bodies different: LLVM merges identical functions into one
// symbol (it did once this crate grew a module), and the test needs two callers.
#[inline(never)]
fn first_caller(pages: usize) -> Result<()> {
    std::hint::black_box(1u32);
    let base = map_anon(pages * PAGE, false)?;
    touch_pages_write(base, pages);
    Ok(())
}

#[inline(never)]
fn second_caller(pages: usize) -> Result<()> {
    std::hint::black_box(2u32);
    let base = map_anon(pages * PAGE, false)?;
    touch_pages_write(base, pages);
    Ok(())
}

/// Faults one page of `base` from a helper that both callers below share.
#[inline(never)]
fn touch_one(base: *mut u8, page: usize, value: u8) {
    // SAFETY: `page` is within the mapping the caller owns.
    unsafe { std::ptr::write_volatile(base.add(page * PAGE), value) };
}

// Different constants, so the linker cannot fold the two callers into one function.
#[inline(never)]
fn caller_a(base: *mut u8, page: usize) {
    touch_one(std::hint::black_box(base), page, 0xa);
}

#[inline(never)]
fn caller_b(base: *mut u8, page: usize) {
    touch_one(std::hint::black_box(base), page, 0xb);
}

/// A helper called from caller_a, caller_a, caller_a, caller_b, repeating (75% / 25%): the
/// callers' frames sit at the same stack addresses, so every fault has the same ip, frame and
/// stack pointer, and only the return address tells them apart. An interpreter's dispatch
/// loop looks like this. Pages are recycled, so the pattern can run long.
fn interleaved_callers(pages: usize) -> Result<()> {
    const WINDOW: usize = 16 * 1024;
    let base = map_anon(WINDOW * PAGE, false)?;
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(WINDOW);
        for page in 0..n {
            if (done + page) % 4 == 3 {
                caller_b(base, page);
            } else {
                caller_a(base, page);
            }
        }
        // SAFETY: drops the contents of our own private anonymous mapping; nothing borrows it.
        if unsafe { libc::madvise(base.cast(), WINDOW * PAGE, libc::MADV_DONTNEED) } != 0 {
            bail!("madvise: {}", std::io::Error::last_os_error());
        }
        done += n;
    }
    report(&format!("pages={pages}"))
}

// A leaf that sets up no frame, as gcc's -momit-leaf-frame-pointer builds leaves and as
// hand-written asm often is: `rbp` still points at its caller's frame when it faults, so the
// frame-pointer walk skips the caller. Its CFI (CFA = rsp + 8 throughout) says where the
// return address is.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".text",
    ".globl memtrace_leaf_store",
    ".type memtrace_leaf_store, @function",
    ".p2align 4",
    "memtrace_leaf_store:",
    ".cfi_startproc",
    "mov byte ptr [rdi], sil",
    "ret",
    ".cfi_endproc",
    ".size memtrace_leaf_store, . - memtrace_leaf_store",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    /// Stores `value` at `p` (the asm above).
    fn memtrace_leaf_store(p: *mut u8, value: u8);
}

/// Touches each page through the frameless leaf: the faults' stacks must read
/// `memtrace_leaf_store -> leaf_caller -> leaf_touch`.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn leaf_caller(base: *mut u8, pages: usize) {
    for i in 0..pages {
        // SAFETY: callers pass a mapping of at least `pages` writable pages; the leaf only
        // stores one byte at the pointer.
        unsafe { memtrace_leaf_store(base.add(i * PAGE), i as u8) };
    }
}

#[cfg(target_arch = "x86_64")]
fn leaf_touch(pages: usize) -> Result<()> {
    let base = map_anon(pages * PAGE, false)?;
    leaf_caller(base, pages);
    report(&format!("pages={pages}"))
}

#[cfg(not(target_arch = "x86_64"))]
fn leaf_touch(_pages: usize) -> Result<()> {
    bail!("leaf-touch is x86_64 only")
}

/// One step down a call chain: `left` or `right` by the path's lowest bit, the fault at the
/// end. A macro, so each level of the chain is one frame in debug builds too.
macro_rules! step {
    ($base:expr, $page:expr, $path:expr, $levels:expr) => {
        if $levels == 0 {
            touch_one($base, $page, 1);
        } else if $path & 1 == 0 {
            go_left($base, $page, $path >> 1, $levels - 1);
        } else {
            go_right($base, $page, $path >> 1, $levels - 1);
        }
    };
}

#[inline(never)]
fn go_left(base: *mut u8, page: usize, path: usize, levels: u32) {
    step!(base, page, path, levels);
    // Work after the call, so it is not a tail call that would drop this frame.
    std::hint::black_box(0x1u8);
}

#[inline(never)]
fn go_right(base: *mut u8, page: usize, path: usize, levels: u32) {
    step!(base, page, path, levels);
    std::hint::black_box(0x2u8);
}

/// `paths` faults, each at the end of its own call chain (its index spelled in `go_left` and
/// `go_right` frames): `paths` distinct user stacks. Pages are recycled, so it can run long.
fn distinct_stacks(paths: usize) -> Result<()> {
    const WINDOW: usize = 16 * 1024;
    let base = map_anon(WINDOW * PAGE, false)?;
    let levels = usize::BITS - paths.saturating_sub(1).leading_zeros();
    for path in 0..paths {
        let page = path % WINDOW;
        // SAFETY: drops the contents of our own private anonymous mapping; nothing borrows it.
        if page == 0
            && path > 0
            && unsafe { libc::madvise(base.cast(), WINDOW * PAGE, libc::MADV_DONTNEED) } != 0
        {
            bail!("madvise: {}", std::io::Error::last_os_error());
        }
        step!(std::hint::black_box(base), page, path, levels);
    }
    report(&format!("paths={paths} levels={levels}"))
}

fn usage() -> ! {
    eprintln!(
        "usage: memtrace-workload anon PAGES | anon-recycle PAGES |\n\
         \x20      kernel-touch PAGES | failed-faults N PAGES | populate PAGES |\n\
         \x20      two-callers PAGES | interleaved-callers PAGES |\n\
         \x20      leaf-touch PAGES | distinct-stacks PATHS |\n\
         \x20      heap PAGES | file PATH PAGES | cow PATH PAGES |\n\
         \x20      threads N PAGES | forks N PAGES | wait-then-anon PAGES | sleep MS | demo DIR |\n\
         \x20      kinds ANON_PAGES SHM_PAGES PATH FILE_PAGES HOLD_MS |\n\
         \x20      leak BYTES_PER_S MS | steady BYTES MS | regions N PAGES UNMAP(0|1|2) HOLD_MS |\n\
         \x20      malloc-large MS BYTES | reserve BYTES_PER_S MS"
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> Result<usize> {
        args.get(i)
            .with_context(|| "missing number")?
            .parse::<usize>()
            .context("not a number")
    };
    let s = |i: usize| -> &str { args.get(i).map_or("", String::as_str) };
    match s(0) {
        "anon" => anon(num(1)?),
        "anon-recycle" => anon_recycle(num(1)?),
        "kernel-touch" => kernel_touch(num(1)?),
        "failed-faults" => failed_faults(num(1)?, num(2)?),
        "populate" => populate(num(1)?),
        "two-callers" => two_callers(num(1)?),
        "interleaved-callers" => interleaved_callers(num(1)?),
        "leaf-touch" => leaf_touch(num(1)?),
        "distinct-stacks" => distinct_stacks(num(1)?),
        "heap" => heap(num(1)?),
        "file" => file(s(1), num(2)?),
        "cow" => cow(s(1), num(2)?),
        "threads" => threads(num(1)?, num(2)?),
        "forks" => forks(num(1)?, num(2)?),
        "wait-then-anon" => wait_then_anon(num(1)?),
        "sleep" => sleep_ms(num(1)? as u64),
        "demo" => demo(if s(1).is_empty() { "/var/tmp" } else { s(1) }),
        "pipes" | "eventfds" => slab_workloads::hold(s(0), num(1)?, num(2)? as u64, num(3)? as u64),
        "slab-leak" => slab_workloads::leak(num(1)? as u64, num(2)? as u64),
        "pipe-churn" => slab_workloads::pipe_churn(num(1)? as u64, num(2).unwrap_or(0)),
        "mmap-churn" => slab_workloads::mmap_churn(num(1)? as u64),
        "files" => slab_workloads::files(s(1), num(2)?, num(3)? as u64),
        "kinds" => mem_workloads::kinds(num(1)?, num(2)?, s(3), num(4)?, num(5)? as u64),
        "leak" => mem_workloads::leak(num(1)?, num(2)? as u64),
        "steady" => mem_workloads::steady(num(1)?, num(2)? as u64),
        "regions" => mem_workloads::regions(num(1)?, num(2)?, num(3)?, num(4)? as u64),
        "malloc-large" => mem_workloads::malloc_large(num(1)? as u64, num(2)?),
        "reserve" => mem_workloads::reserve(num(1)?, num(2)? as u64),
        _ => usage(),
    }
}
