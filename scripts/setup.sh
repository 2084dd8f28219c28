#!/usr/bin/env bash
# Prepare this host for virtnbdbackup: system packages, running libvirt
# daemons and a venv with the package installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the commands need on a host; docker/Dockerfile installs the same list
# (tests/unit/test_dockerfile.py compares them).
# nbdfuse is in libnbd-bin on Debian 12 (the nbdfuse package name is only
# virtual there, so dpkg never reports it installed).
RUNTIME_PACKAGES=(
    qemu-utils qemu-block-extra
    nbdkit nbdkit-plugin-python libnbd-bin fuse3
    python3-libnbd python3-libvirt python3-lz4 liblz4-1 python3-tqdm python3-venv python3-wheel
    openssh-client
)
# What the tests and the demo need on top: libvirtd and QEMU to run throw-away
# VMs, groff to check that the man pages render, and an sshd and openssl for
# the remote and TLS tests, and what scripts/build-test-guest.sh builds the
# Linux test guest from (a kernel, busybox, the guest agent, cpio), and swtpm
# for the TPM state test.
TEST_PACKAGES=(
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 ovmf e2fsprogs groff-base openssh-server openssl
    linux-image-amd64 busybox-static qemu-guest-agent cpio util-linux swtpm swtpm-tools
)
PACKAGES=("${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}")

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd runs swtpm as tss once that user exists, as root before it did
# (swtpm-tools adds it). A local CA made by a root swtpm is then unreadable,
# and every TPM domain fails to start; hand the CA to tss as swtpm-tools does.
localca=/var/lib/swtpm-localca
if [ -d "$localca" ] && getent passwd tss >/dev/null \
    && [ -n "$(find "$localca" ! -user tss -print -quit)" ]; then
    chown -R tss:root "$localca"
fi

scripts/start-libvirtd.sh
venv/create.sh --dev
