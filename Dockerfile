# syntax=docker/dockerfile:1
#
# kube-ebpf-proxy node agent image.
#
#   docker build -t REGISTRY/kube-ebpf-proxy:TAG .
#
# Stage 1 builds the eBPF object (nightly, bpfel-unknown-none, bpf-linker)
# and the agent, which embeds that object; stage 2 holds only the binary.
# Deployment: manifests/deploy/.

############################ build ############################
# Stable toolchain at the workspace's rust-version, on the same Debian
# release as the runtime stage (same glibc).
FROM rust:1.95-bookworm AS build

# The eBPF crate needs nightly with rust-src (-Z build-std=core). `cargo
# xtask build-ebpf` runs `cargo +nightly`, so the toolchain must be the one
# called "nightly"; its LLVM must be 22, the version the bpf-linker below is
# built for (as in xtask/src/main.rs).
RUN rustup toolchain install nightly --profile minimal --component rust-src

# bpf-linker linked against the nightly's own libLLVM, exactly as
# `cargo xtask setup` (xtask/src/main.rs, install_bpf_linker) does: expose
# the sysroot's libLLVM.so.22* under an LLVM prefix as libLLVM.so and under
# its own name, then build bpf-linker with LLVM_PREFIX pointing there (the
# binary's RUNPATH keeps pointing there, so the links must stay).
RUN set -eux; \
    libdir="$(rustc +nightly --print sysroot)/lib"; \
    llvm="$(ls "$libdir"/libLLVM.so.22* | head -n 1)"; \
    prefix="$HOME/.local/share/kube-ebpf-proxy/llvm"; \
    mkdir -p "$prefix/lib"; \
    ln -sf "$llvm" "$prefix/lib/libLLVM.so"; \
    ln -sf "$llvm" "$prefix/lib/$(basename "$llvm")"; \
    LLVM_PREFIX="$prefix" cargo install bpf-linker --version '^0.13' \
        --no-default-features --features llvm-22; \
    bpf-linker --version

WORKDIR /src
COPY . .

# The eBPF object first (into target/ebpf/, where proxy-userspace's build.rs
# looks for it), then the agent. Caches speed up rebuilds; the binary is
# copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    cargo xtask build-ebpf; \
    cargo build --release --locked -p proxy-userspace; \
    cp target/release/kube-ebpf-proxy /usr/local/bin/kube-ebpf-proxy

############################ runtime ############################
# Only the binary. It links nothing beyond glibc (TLS is rustls, the
# in-cluster CA comes from the service account), and the DaemonSet's init
# container uses this image's /bin/sh, stat and mount to mount bpffs.
FROM debian:bookworm-slim

COPY --from=build /usr/local/bin/kube-ebpf-proxy /usr/local/bin/kube-ebpf-proxy

ENTRYPOINT ["/usr/local/bin/kube-ebpf-proxy"]
CMD ["run"]
