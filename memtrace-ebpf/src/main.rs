//! memtrace's kernel programs: one module per hook family.
//!
//! Only tracepoints and perf software events are used (no kprobes, no fentry). Classic
//! tracepoint records are read at offsets the agent has checked against tracefs (see
//! `memtrace_common::layout`); BTF-typed tracepoints read their arguments and the current task
//! with plain loads the verifier checks against the kernel's BTF, at offsets the agent reads
//! from it; `memtrace vma`'s raw-tracepoint fallback and `slab`'s cache names use
//! `bpf_probe_read_kernel`.
#![no_std]
#![no_main]

mod faults;
mod maps;
mod proc;
mod rss;
mod slab;
mod vma;

// Only on the BPF target: a host build (clippy over the workspace) links std through the
// agent's feature set of memtrace-common, and std brings its own.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this; it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
