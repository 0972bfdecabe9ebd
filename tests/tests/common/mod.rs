//! Helpers every integration test file needs: the built binaries and the root check.
use std::path::PathBuf;

pub fn workload() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_memtrace-workload"))
}

pub fn memtrace() -> PathBuf {
    let p = workload().with_file_name("memtrace");
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the integration tests load eBPF programs: run them as root"
    );
}
