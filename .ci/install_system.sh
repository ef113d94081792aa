#!/usr/bin/env bash
# System packages the tests need (Debian/Ubuntu): cmake + a host C++ compiler for the hago
# device runner, the aarch64 cross compiler and qemu-user to run aarch64 (Raspberry Pi 4)
# binaries on x86. Idempotent and quiet: does nothing when everything is installed.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_system.sh: need root or sudo to install: ${need[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system.sh: no apt-get; install by hand: ${need[*]}" >&2
    exit 1
fi

echo "install_system.sh: installing ${need[*]}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
       >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_system.sh: apt-get failed" >&2
    exit 1
fi
