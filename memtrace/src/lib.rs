//! memtrace: an eBPF page-fault and allocation tracer.
//!
//! The library does the work (load, collect, model, symbolize, report); `main.rs` is a thin CLI.
//! Data flow: kernel programs ([`hooks`], [`loader`]) -> ring buffer -> [`engine`] run loop ->
//! an [`analysis`] -> [`collector`] (process table, address-space model) -> [`fault`]
//! aggregates -> [`report`].
pub mod addrspace;
pub mod analysis;
pub mod btf;
pub mod check;
pub mod collector;
pub mod engine;
pub mod error;
pub mod fault;
pub mod hooks;
pub mod ksyms;
pub mod loader;
pub mod perf;
pub mod procmem;
pub mod record;
pub mod report;
pub mod ring;
pub mod sideband;
pub mod slab;
pub mod stacks;
pub mod symbolize;
pub mod tracefs;
pub mod units;
pub mod unwind;
pub mod vma;
pub mod watch;

pub use error::Error;
