#!/usr/bin/env bash
# Set up this host, check style and types, run the whole test suite
# (unit tests and tests against real libvirt, QEMU and qemu-nbd).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
scripts/setup.sh
py=venv/env/bin/python
"$py" -m ruff check libvirtnbdbackup tests
"$py" -m mypy libvirtnbdbackup
exec "$py" -m pytest "$@"
