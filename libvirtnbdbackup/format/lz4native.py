"""LZ4 frames decompressed by liblz4 straight into the caller's buffer.

python-lz4 returns each decompressed slice as a new bytes object and always
checks the frame's xxHash checksums. Called through ctypes, liblz4 writes
into a buffer that is reused slice after slice, and it can skip those
checksums where a stronger check of the same bytes is made anyway: a
restore sums every stored byte it reads into the file's Adler-32, which
must match the manifest or ``.chksum`` before the image is committed.
ctypes releases the GIL for the call, so threads decompress side by side.

The options' ``skipChecksums`` field is read by liblz4 1.9.4 and newer;
older ones ignore it (it was a reserved field) and check as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from ..errors import StreamError

_VERSION = 100  # LZ4F_VERSION, the frame API's version


class _DecompressOptions(ctypes.Structure):
    _fields_ = [
        ("stableDst", ctypes.c_uint),
        ("skipChecksums", ctypes.c_uint),
        ("reserved1", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
    ]


def _load() -> ctypes.CDLL:
    for name in ("liblz4.so.1", ctypes.util.find_library("lz4")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.LZ4F_createDecompressionContext.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_uint,
        ]
        lib.LZ4F_createDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_freeDecompressionContext.argtypes = [ctypes.c_void_p]
        lib.LZ4F_freeDecompressionContext.restype = ctypes.c_size_t
        lib.LZ4F_resetDecompressionContext.argtypes = [ctypes.c_void_p]
        lib.LZ4F_resetDecompressionContext.restype = None
        lib.LZ4F_decompress.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(_DecompressOptions),
        ]
        lib.LZ4F_decompress.restype = ctypes.c_size_t
        lib.LZ4F_isError.argtypes = [ctypes.c_size_t]
        lib.LZ4F_isError.restype = ctypes.c_uint
        lib.LZ4F_getErrorName.argtypes = [ctypes.c_size_t]
        lib.LZ4F_getErrorName.restype = ctypes.c_char_p
        return lib
    raise StreamError(
        "liblz4 (liblz4.so.1) is not installed: it is needed to read compressed "
        "backups (Debian: apt install liblz4-1)"
    )


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


def _address(view: memoryview) -> int:
    """Where a writable buffer's bytes start (``view`` must not be empty)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class FrameDecoder:
    """One liblz4 decompression context: frame after frame, in one thread."""

    def __init__(self) -> None:
        self._lib = _library()
        self._ctx = ctypes.c_void_p()
        code = self._lib.LZ4F_createDecompressionContext(ctypes.byref(self._ctx), _VERSION)
        if self._lib.LZ4F_isError(code):
            raise MemoryError("liblz4 cannot make a decompression context")
        self._checked = _DecompressOptions(0, 0, 0, 0)
        self._unchecked = _DecompressOptions(0, 1, 0, 0)
        self._dst_size = ctypes.c_size_t()
        self._src_size = ctypes.c_size_t()

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx:
            self._lib.LZ4F_freeDecompressionContext(ctx)
            self._ctx = ctypes.c_void_p()

    def reset(self) -> None:
        """Forget a frame left unfinished: the next call starts a new one."""
        self._lib.LZ4F_resetDecompressionContext(self._ctx)

    def decode(self, src: memoryview, dst: memoryview, check: bool) -> tuple[int, int, bool]:
        """Feed ``src`` (writable, e.g. a bytearray's view), fill ``dst``;
        return (bytes of ``src`` used, bytes written to ``dst``, frame
        ended). ``check``: verify the frame's block and content xxHash."""
        self._src_size.value = len(src)
        self._dst_size.value = len(dst)
        src_at = _address(src) if len(src) else None
        code = self._lib.LZ4F_decompress(
            self._ctx,
            _address(dst),
            ctypes.byref(self._dst_size),
            src_at,
            ctypes.byref(self._src_size),
            ctypes.byref(self._checked if check else self._unchecked),
        )
        if self._lib.LZ4F_isError(code):
            name = self._lib.LZ4F_getErrorName(code).decode(errors="replace")
            self.reset()
            raise ValueError(name.removeprefix("ERROR_"))
        return self._src_size.value, self._dst_size.value, code == 0
