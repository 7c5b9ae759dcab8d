#!/usr/bin/env bash
# A static nginx-graceful (musl): one file that needs nothing from the image it is copied into,
# not even a libc. Prints its path. ring (TLS for soak and rehearse) compiles C, hence musl-gcc
# (Debian's musl-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v musl-gcc >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends musl-tools >&2
fi
rustup target add x86_64-unknown-linux-musl >&2
CC_x86_64_unknown_linux_musl=musl-gcc \
  cargo build --release --locked --target x86_64-unknown-linux-musl >&2
echo target/x86_64-unknown-linux-musl/release/nginx-graceful
