#!/usr/bin/env bash
# Rebuild man/*.1 from the commands' argument parsers (one page per console
# script in pyproject.toml). Run it after changing an option, and commit man/.
#   scripts/gen-man.sh           write the pages
#   scripts/gen-man.sh --check   write nothing; exit 1 and show the diff when man/ is stale
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$repo/venv/env/bin/python"
if [ ! -x "$py" ]; then
    echo "gen-man: no venv at $repo/venv/env; build it with scripts/setup.sh or venv/create.sh" >&2
    exit 1
fi
if ! "$py" -c 'import argparse_manpage' 2>/dev/null; then
    echo "gen-man: argparse-manpage is missing in the venv; run scripts/setup.sh" \
         "(it installs the dev extras of pyproject.toml)" >&2
    exit 1
fi
exec "$py" -m libvirtnbdbackup.cli.manpages "$@"
