//! memtrace: an eBPF page-fault and allocation tracer.
//!
//! The library does the work (load, collect, model, symbolize, report); `main.rs` is a thin CLI.
//! Data flow: kernel programs -> ring buffer -> [`collector`] (address-space model) ->
//! [`fault`] aggregates -> [`report`].
pub mod addrspace;
pub mod check;
pub mod collector;
pub mod error;
pub mod fault;
pub mod loader;
pub mod record;
pub mod report;
pub mod session;
pub mod sideband;
pub mod stacks;
pub mod symbolize;
pub mod tracefs;
pub mod unwind;

pub use error::Error;
