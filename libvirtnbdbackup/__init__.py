"""Online, thin, incremental backups of libvirt/KVM virtual machines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("virtnbdbackup")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
