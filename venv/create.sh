#!/usr/bin/env bash
# Build a venv that sees the distribution's libvirt and libnbd bindings
# (neither is installable from PyPI) and install virtnbdbackup into it.
# Safe to run again: an existing venv is reused and the package reinstalled.
set -euo pipefail

usage() {
    cat <<EOF
Usage: venv/create.sh [--dev] [VENV_DIR]

Build a Python venv on /usr/bin/python3 that also sees the distribution's
python3-libvirt and python3-libnbd, and install virtnbdbackup into it.

  VENV_DIR   where to build it (default: venv/env in this checkout)
  --dev      editable install plus the test and lint tools (scripts/setup.sh uses it)
  -h, --help show this help

VENV_PYTHON names another interpreter to build on (default: /usr/bin/python3);
it must be the one the distribution's python3-libvirt and python3-libnbd are for.

Where systemd runs (without --dev), or when SYSTEMD_UNIT_DIR is set, the virtnbdfleet service
and timer units are installed into SYSTEMD_UNIT_DIR (default:
/etc/systemd/system), pointing at this venv; units edited there by hand
are left alone. Nothing is enabled: systemctl enable --now virtnbdfleet.timer.

The commands are then VENV_DIR/bin/virtnbdbackup, virtnbdrestore, ...;
without --dev their man pages go to VENV_DIR/share/man/man1, where man(1)
finds them once VENV_DIR/bin is on PATH.
EOF
}

dev=0
target=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dev) dev=1 ;;
        -*) echo "venv: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            [ -z "$target" ] || { echo "venv: one VENV_DIR only" >&2; exit 2; }
            target="$1" ;;
    esac
    shift
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${target:-$repo/venv/env}"
python="${VENV_PYTHON:-/usr/bin/python3}"

fail() {
    echo "venv: $*" >&2
    exit 1
}

[ -x "$python" ] || fail "$python is missing: install python3 (Debian, Fedora)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$python is $("$python" -V 2>&1 | cut -d' ' -f2); virtnbdbackup needs Python 3.10 or newer"

missing=()
"$python" -c 'import libvirt' 2>/dev/null || missing+=("libvirt (Debian and Fedora: python3-libvirt)")
"$python" -c 'import nbd' 2>/dev/null || missing+=("nbd (Debian and Fedora: python3-libnbd)")
"$python" -c 'import ensurepip' 2>/dev/null || missing+=("ensurepip (Debian: python3-venv)")
if [ ${#missing[@]} -gt 0 ]; then
    printf 'venv: %s cannot import:\n' "$python" >&2
    printf '  %s\n' "${missing[@]}" >&2
    fail "install those packages, then run this again"
fi
for tool in qemu-img qemu-nbd; do
    command -v "$tool" >/dev/null \
        || echo "venv: warning: $tool is missing (Debian: qemu-utils, Fedora: qemu-img);" \
                "restore and offline backups need it" >&2
done

if [ -e "$target" ]; then
    [ -f "$target/pyvenv.cfg" ] || fail "$target exists and is not a venv: choose another VENV_DIR"
    grep -qE '^include-system-site-packages *= *true' "$target/pyvenv.cfg" \
        || fail "$target is a venv without --system-site-packages; remove it and run this again"
else
    "$python" -m venv --system-site-packages "$target"
fi
py="$target/bin/python"
[ -x "$py" ] || fail "$target has no bin/python; remove it and run this again"

pip=("$py" -m pip install -q --disable-pip-version-check)
# With setuptools >= 61 and wheel at hand (python3-venv, python3-wheel) the
# package is built offline; otherwise pip fetches them for the build.
if "$py" -c 'import setuptools, sys, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) < 61)' \
    2>/dev/null; then
    pip+=(--no-build-isolation)
fi
if [ "$dev" = 1 ]; then
    "${pip[@]}" -e "$repo[dev]"
else
    rm -rf "$repo/build"  # setuptools' scratch: a stale copy could slip into the wheel
    "${pip[@]}" "$repo"  # pip reinstalls a local folder, so a rerun picks up changes
fi
"$target/bin/virtnbdbackup" --version >/dev/null || fail "the installed virtnbdbackup does not run"

# The scheduling units of virtnbdfleet, where systemd can run them.
unit_dir="${SYSTEMD_UNIT_DIR:-}"
if [ -z "$unit_dir" ] && [ "$dev" = 0 ] && [ -d /run/systemd/system ] && [ "$(id -u)" = 0 ]; then
    unit_dir=/etc/systemd/system
fi
if [ -n "$unit_dir" ]; then
    mkdir -p "$unit_dir"
    bindir="$(cd "$target/bin" && pwd)"
    for unit in virtnbdfleet.service virtnbdfleet.timer; do
        dest="$unit_dir/$unit"
        if [ -e "$dest" ] && ! grep -q '^# Installed by venv/create.sh' "$dest"; then
            echo "venv: $dest was written by someone else: left alone" >&2
            continue
        fi
        sed "s|@BINDIR@|$bindir|g" "$repo/contrib/systemd/$unit" > "$dest.partial"
        mv "$dest.partial" "$dest"
    done
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload || echo "venv: warning: systemctl daemon-reload failed" >&2
    fi
    echo "venv: systemd units in $unit_dir (systemctl enable --now virtnbdfleet.timer)"
fi
echo "venv: ready at $target"
