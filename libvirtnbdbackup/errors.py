"""Exceptions that end a job with a message the user can act on.

Every layer raises a subclass of :class:`VirtnbdError`; the command line
catches it once, logs the message and exits 1.
"""


class VirtnbdError(Exception):
    """Base class: the message says what failed and what to do about it."""


class UsageError(VirtnbdError):
    """The options do not fit together or do not fit the target."""


class DomainError(VirtnbdError):
    """libvirt refused, or the domain is not in a state we can work with."""


class NbdError(VirtnbdError):
    """The NBD connection failed or an NBD request failed."""


class QemuToolError(VirtnbdError):
    """qemu-img or qemu-nbd failed."""


class StreamError(VirtnbdError):
    """A data file is truncated, corrupt or does not follow the stream format."""


class TargetError(VirtnbdError):
    """The backup or restore target cannot be written as asked."""


class Interrupted(VirtnbdError):
    """The user asked us to stop (SIGINT or SIGTERM)."""


class SshError(VirtnbdError):
    """The hypervisor host cannot be reached over SSH, or a command there failed."""


class FolderLocked(TargetError):
    """Another live process holds the lock of a backup or restore folder."""


class AgentError(VirtnbdError):
    """The guest agent is not configured, not running, did not answer in
    time, or refused a command."""

    # A call given up on that still runs on its helper thread (guestagent.Pending).
    pending: object = None
