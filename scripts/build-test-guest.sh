#!/usr/bin/env bash
# Build the small Linux test guest from the Debian packages installed on this
# host, offline: the kernel of linux-image-amd64 and an initramfs holding
# busybox-static, qemu-guest-agent and its libraries, the kernel's virtio and
# ext4 modules, mke2fs (e2fsprogs) and fstrim (util-linux).
#
#   scripts/build-test-guest.sh CACHE_DIR
#
# prints the folder holding vmlinuz and initrd.img. The folder is named after
# a hash of the inputs (this script and the packages' versions), so a build is
# made once per machine and made again only when an input changes.
#
# The guest's /init loads the modules, formats /dev/vda and /dev/vdb with ext4
# when they hold no filesystem yet, mounts them on /mnt/vda and /mnt/vdb and
# runs qemu-ga on the virtio port org.qemu.guest_agent.0.
set -euo pipefail

cache=${1:?usage: build-test-guest.sh CACHE_DIR}
packages=(linux-image-amd64 busybox-static qemu-guest-agent e2fsprogs util-linux)
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || {
        echo "build-test-guest: package $pkg is missing; run scripts/setup.sh" >&2
        exit 1
    }
done
# The kernel linux-image-amd64 depends on: the newest installed one.
kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*' \
    | head -n1 | sed 's/^linux-image-//')
[ -f "/boot/vmlinuz-$kver" ] && [ -d "/lib/modules/$kver" ] || {
    echo "build-test-guest: kernel $kver of linux-image-amd64 not found in /boot" >&2
    exit 1
}
key=$({
    cat "$0"
    echo "$kver"
    dpkg-query -W -f='${Package} ${Version}\n' "${packages[@]}"
} | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/initrd.img" ] && [ -f "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/sbin,lib/modules,lib64,etc,proc,sys,dev,run,tmp,mnt/vda,mnt/vdb}

# A binary and every library ldd names, at the same paths.
copy_with_libs() {
    local bin=$1
    install -D -m 0755 "$bin" "$root$bin"
    ldd "$bin" | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$lib" "$root$lib"
    done
}
install -m 0755 /bin/busybox "$root/bin/busybox"
copy_with_libs /usr/sbin/qemu-ga
copy_with_libs /sbin/mke2fs
copy_with_libs /sbin/fstrim
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

# Modules in dependency order (modules.dep lists a module's dependencies),
# each once; crc32c is ext4's soft dependency.
moddir=/lib/modules/$kver
declare -A seen=()
order=()
add_module() {
    local rel=$1 dep
    [ -n "${seen[$rel]:-}" ] && return
    seen[$rel]=1
    for dep in $(grep "^$rel:" "$moddir/modules.dep" | cut -d: -f2); do
        add_module "$dep"
    done
    order+=("$rel")
}
for name in virtio_pci virtio_blk virtio_console crc32c_generic ext4; do
    rel=$(grep -E "(^|/)$name\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | cut -d: -f1)
    [ -n "$rel" ] || { echo "build-test-guest: module $name not found in $moddir" >&2; exit 1; }
    add_module "$rel"
done
for rel in "${order[@]}"; do
    base=$(basename "$rel")
    case "$base" in
        *.ko.xz) xz -dc "$moddir/$rel" >"$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$moddir/$rel" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >>"$root/lib/modules/order"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
for mod in $(cat /lib/modules/order); do
    insmod "/lib/modules/$mod" || echo "init: insmod $mod failed"
done
for _ in $(seq 1 50); do
    [ -b /dev/vda ] && [ -b /dev/vdb ] && break
    sleep 0.1
done
for disk in vda vdb; do
    [ -b "/dev/$disk" ] || continue
    # No lazy init: a background thread writing the inode tables after the
    # mount would change the disk behind the tests' backs.
    if ! mount -t ext4 -o noinit_itable "/dev/$disk" "/mnt/$disk" 2>/dev/null; then
        /sbin/mke2fs -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 "/dev/$disk"
        mount -t ext4 -o noinit_itable "/dev/$disk" "/mnt/$disk"
    fi
done
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
echo "init: guest agent on ${port:-(no port)}"
if [ -n "$port" ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid \
        -F/etc/fsfreeze-hook &
fi
echo "init: ready"
while true; do sleep 3600; done
EOF
chmod 0755 "$root/init"
# The agent runs this before each freeze: a test that needs a slow freeze
# (to signal the backup while the guest is frozen) writes seconds to
# /run/freeze-delay.
cat >"$root/etc/fsfreeze-hook" <<'EOF'
#!/bin/sh
[ "$1" = freeze ] && [ -f /run/freeze-delay ] && sleep "$(cat /run/freeze-delay)"
exit 0
EOF
chmod 0755 "$root/etc/fsfreeze-hook"

(cd "$root" && find . -print0 | sort -z | cpio --quiet -o -0 -H newc) | gzip -1 >"$work/initrd.img"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"
chmod 0644 "$work/initrd.img" "$work/vmlinuz"
mkdir -p "$work/out"
mv "$work/initrd.img" "$work/vmlinuz" "$work/out/"
# Another build may have finished first: keep whichever landed.
mv -T "$work/out" "$out" 2>/dev/null || [ -f "$out/initrd.img" ]
echo "$out"
