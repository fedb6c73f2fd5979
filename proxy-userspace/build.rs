//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the agent.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let object = std::env::var_os("KEP_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/ebpf/bpfel-unknown-none/release/proxy-ebpf"));
    println!("cargo:rerun-if-env-changed=KEP_BPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        eprintln!(
            "error: eBPF object {} not found: run `cargo xtask setup && cargo xtask build-ebpf` first",
            object.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-env=KEP_BPF_OBJECT={}", object.display());
}
