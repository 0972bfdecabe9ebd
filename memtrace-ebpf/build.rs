/// Building this crate needs the `bpf-linker` binary (`cargo xtask setup` installs it); rebuild
/// when it changes.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
