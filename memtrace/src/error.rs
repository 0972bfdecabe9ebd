//! The library's error type: each variant is a situation a user can act on.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(
        "memtrace needs root (or the capabilities CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN) \
         to load eBPF programs; run it with sudo"
    )]
    NotRoot,
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("this kernel has no tracepoint {tracepoint} ({reason})")]
    MissingTracepoint { tracepoint: String, reason: String },
    #[error("tracepoint {tracepoint} field {field}: memtrace expects {expected}, this kernel has {found}")]
    LayoutMismatch {
        tracepoint: String,
        field: String,
        expected: String,
        found: String,
    },
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("pid {pid} is a kernel thread ({comm}): it has no user memory (no page faults, no mappings) to trace")]
    KernelThread { pid: u32, comm: String },
    #[error("cannot start {command}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    #[error("attaching {what} failed: {reason}")]
    Attach { what: String, reason: String },
    #[error("{0}")]
    Map(String),
}
