#!/usr/bin/env bash
# A static nginx-graceful (musl): one file that needs nothing from the image it is copied into,
# not even a libc. Prints its path. The supervisor compiles no C, so no C compiler for musl.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add x86_64-unknown-linux-musl >&2
cargo build --release --locked -p nginx-graceful --target x86_64-unknown-linux-musl >&2
echo "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/release/nginx-graceful"
