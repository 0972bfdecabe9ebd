//! Helpers every integration test file needs: the built binaries and the root check.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

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

/// Starts memtrace with `args` in the background and waits for its banner (printed once it is
/// tracing); returns the child (its stderr pipe kept open) and that banner line.
pub fn start_memtrace(args: &[&str], stdout: Stdio) -> (Child, String) {
    require_root();
    let mut mt = Command::new(memtrace())
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memtrace");
    let mut banner = String::new();
    BufReader::new(mt.stderr.as_mut().expect("stderr"))
        .read_line(&mut banner)
        .expect("banner");
    assert!(banner.contains("tracing page faults"), "{banner}");
    (mt, banner)
}
