#!/usr/bin/env bash
# Installs what the demo and the tests need and a fresh Debian machine lacks: nginx, curl and
# unshare (util-linux). Does nothing when everything is there already.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v curl >/dev/null || need+=(curl)
command -v unshare >/dev/null || need+=(util-linux)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${need[*]}" >&2
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
