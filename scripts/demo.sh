#!/usr/bin/env bash
# Set up this host, then show the main job on a throw-away VM: write known
# data into its disk, take a full backup while it runs, restore it and prove
# the restored image identical to the original.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
"$repo/scripts/setup.sh"

bin="$repo/venv/env/bin"
name=virtnbdbackup-demo
images=/var/lib/libvirt/images/$name
work=/var/tmp/$name
kind=qemu
[ -c /dev/kvm ] && [ "$(stat -c %a /dev/kvm)" = 660 ] && kind=kvm

remove_vm() {
    virsh -q destroy "$name" >/dev/null 2>&1 || true
    virsh -q undefine "$name" --checkpoints-metadata >/dev/null 2>&1 || true
}
remove_vm
trap 'remove_vm; rm -rf "$images"' EXIT
rm -rf "$images" "$work"
mkdir -p "$images" "$work"
chmod 755 "$images"

echo "== demo: a 2 GiB qcow2 disk with 24 MiB of known data, the rest holes"
disk=$images/$name.qcow2
qemu-img create -q -f qcow2 "$disk" 2G
qemu-io -f qcow2 "$disk" -c "write -P 0xab 0 8M" -c "write -P 0xcd 1G 8M" \
    -c "write -P 0xef 2040M 8M" >/dev/null

virsh -q define /dev/stdin >/dev/null <<XML
<domain type='$kind'>
  <name>$name</name>
  <memory unit='MiB'>128</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
XML
virsh -q start "$name" >/dev/null
echo "== demo: VM $name is running; taking a full backup"
"$bin/virtnbdbackup" -d "$name" -l full -o "$work/backup" -n

echo "== demo: restoring into $work/restore"
"$bin/virtnbdrestore" -i "$work/backup" -o "$work/restore" -n
"$bin/virtnbdrestore" -i "$work/backup" -o verify

echo "== demo: comparing the restored image with the original"
qemu-img compare -U "$disk" "$work/restore/$name.qcow2"

cat <<DONE

Demo done: the restored image is identical to the original.
  backup set:     $work/backup   ($(du -sh "$work/backup" | cut -f1) for a 2 GiB disk)
  restored image: $work/restore/$name.qcow2
  commands:       $bin/virtnbdbackup, $bin/virtnbdrestore
The demo VM and its disk are removed now.
DONE
