"""Online, thin, incremental backups of libvirt/KVM virtual machines."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Lazily: importlib.metadata costs a noticeable part of the start-up,
    # before the signal handlers are in place (cli/launch.py).
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("virtnbdbackup")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"
