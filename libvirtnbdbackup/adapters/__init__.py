"""Adapters to the world outside: libvirt, NBD, qemu tools."""
