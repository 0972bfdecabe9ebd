//! Present so that `memtrace` can name this crate as a build-dependency (cargo then rebuilds the
//! agent when the kernel programs change); the programs themselves are the `memtrace` binary.
#![no_std]
