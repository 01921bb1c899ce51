"""WebSocket masking: ``apply_mask`` (C when python-websockets is installed) and mask keys.  [pure]

The codec (:mod:`iwsproxy.frames`) re-exports both; this module only keeps them apart.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

__all__ = ["apply_mask", "python_apply_mask", "MaskSource"]

_MASK_POOL_BYTES = 4096


def python_apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``key`` (masking and unmasking are the same).

    Pure Python at C speed for the XOR itself (one big-integer operation), but
    the conversions cost about 2 ms per MiB.
    """
    n = len(data)
    if not n:
        return b""
    stream = key * (n >> 2) + key[: n & 3]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _load_c_apply_mask():
    """python-websockets' C ``apply_mask`` (SIMD: about 0.02 ms per MiB), or None.

    The extension module is loaded on its own, without importing the
    ``websockets`` package, which would pull in asyncio, email and socket and
    make this module impure.
    """
    try:
        spec = importlib.util.find_spec("websockets")
        if spec is None or not spec.submodule_search_locations:
            return None
        found = importlib.machinery.PathFinder.find_spec("websockets.speedups", spec.submodule_search_locations)
        if found is None or not isinstance(found.loader, importlib.machinery.ExtensionFileLoader):
            return None
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        return module.apply_mask
    except (ImportError, OSError, AttributeError):
        return None


_c_apply_mask = _load_c_apply_mask()
#: the masking function in use: the C one when python-websockets is installed
apply_mask = _c_apply_mask or python_apply_mask


class MaskSource:
    """Strong, cheap mask keys: one ``os.urandom`` call per 1024 keys."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def keys(self, count: int) -> bytes:
        """``count`` fresh 4-byte keys in one bytes object (a write batch takes its keys at once)."""
        size = 4 * count
        pos = self._pos
        if pos + size > len(self._pool):
            if size > _MASK_POOL_BYTES:
                return os.urandom(size)
            self._pool = os.urandom(_MASK_POOL_BYTES)
            pos = 0
        self._pos = pos + size
        return self._pool[pos : pos + size]

    def next_key(self) -> bytes:
        return self.keys(1)
