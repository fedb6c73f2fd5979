//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the agent.
//!
//! Without the object (a fresh clone, no nightly toolchain or bpf-linker),
//! an empty stub is embedded instead, as aya's template does: `cargo
//! check`, `clippy` and the pure unit tests then build and run anywhere,
//! and an agent built that way refuses to start with a clear error.
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
    let embedded = if object.exists() {
        object
    } else {
        println!(
            "cargo:warning=eBPF object {} not found: embedding an empty stub (the agent will not \
             start); run `cargo xtask setup && cargo xtask build-ebpf` for a working agent",
            object.display()
        );
        let stub = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("proxy-ebpf-stub");
        std::fs::write(&stub, []).expect("write the stub object");
        stub
    };
    println!("cargo:rustc-env=KEP_BPF_OBJECT={}", embedded.display());
}
