#!/usr/bin/env bash
# Start virtlogd and libvirtd when they are not running (for hosts and
# containers without systemd) and wait until libvirtd answers.
set -euo pipefail

# What udev does on a normal host: let the qemu user (group kvm) use KVM.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm 2>/dev/null && chmod 0660 /dev/kvm 2>/dev/null || true
fi

if virsh -c qemu:///system version >/dev/null 2>&1; then
    exit 0
fi
getent passwd libvirt-qemu >/dev/null || {
    echo "start-libvirtd: user libvirt-qemu is missing; install libvirt-daemon-system" >&2
    exit 1
}
mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt/images
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
echo "start-libvirtd: libvirtd did not answer on qemu:///system within 20 s" >&2
exit 1
