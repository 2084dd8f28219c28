#!/usr/bin/env bash
# Build a venv that sees the distribution's libvirt and libnbd bindings
# (neither is installable from PyPI) and install virtnbdbackup into it.
# Usage: venv/create.sh [VENV_DIR]   (default: venv/env)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$repo/venv/env}"

/usr/bin/python3 -c 'import libvirt, nbd' 2>/dev/null || {
    echo "venv: /usr/bin/python3 cannot import libvirt and nbd;" \
         "install python3-libvirt and python3-libnbd" >&2
    exit 1
}
[ -x "$target/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$target"
"$target/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[dev]"
echo "venv: ready at $target"
