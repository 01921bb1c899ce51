"""The compiled hot path, when there is one: ``speedups`` is :mod:`iwsproxy._speedups` or None.  [pure]

``setup.py`` builds ``iwsproxy/_speedups.c`` when a C compiler is present (a failed build
leaves it out and the install goes on). Without it, or with the environment variable
``IWSPROXY_PURE_PYTHON`` set to a non-empty value when the process starts, the codec
(:mod:`iwsproxy.frames`) and the buffers (:mod:`iwsproxy.buffer`) run their pure-Python code,
which gives the same results (``tests/unit/test_speedups.py``).
"""

from __future__ import annotations

import os

__all__ = ["speedups"]


def _load():
    if os.environ.get("IWSPROXY_PURE_PYTHON"):
        return None
    try:
        from iwsproxy import _speedups
    except ImportError:
        return None
    return _speedups


speedups = _load()
