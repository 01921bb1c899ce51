"""Retry delays and ejection durations (pure: no I/O, no clock, randomness injected).

Both functions grow a delay exponentially up to a cap and add jitter so that
many pipes failing at the same moment do not retry in lockstep. Jitter only
ever moves a delay *down* from its cap (or is clipped back to it), so no value
exceeds ``max_s``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["backoff", "retry_delay", "eject_duration"]

EJECT_JITTER = 0.1  # eject_duration() varies each duration by +-10%


def _grown(base_s: float, factor: float, steps: int, max_s: float) -> float:
    """``min(max_s, base_s * factor**steps)``, safe for any ``steps`` (no OverflowError)."""
    try:
        return min(max_s, base_s * factor**steps)
    except OverflowError:  # factor**steps does not fit in a float: far above any cap
        return max_s


def backoff(
    *,
    initial_s: float = 0.05,
    factor: float = 2.0,
    max_s: float = 5.0,
    jitter: float = 0.5,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield retry delays in seconds, forever.

    The **first value is always 0.0**: after a failure, the first retry goes to a
    *different* backend, so it is made at once. Then, for ``n = 0, 1, 2, ...``::

        cap_n   = min(max_s, initial_s * factor**n)       # 0.05, 0.1, 0.2, ... 5.0, 5.0, ...
        delay_n = cap_n * uniform(1 - jitter, 1)

    This is downward jitter: each delay lies in ``[cap_n * (1 - jitter), cap_n]``,
    so the caps never decrease and no delay ever exceeds ``max_s``.
    ``jitter=0`` gives the bare caps. Pass a seeded ``rng`` for a repeatable sequence.
    """
    if initial_s <= 0 or factor < 1 or max_s < 0 or not 0 <= jitter <= 1:
        raise ValueError(
            f"backoff needs initial_s > 0, factor >= 1, max_s >= 0, 0 <= jitter <= 1 "
            f"(got initial_s={initial_s}, factor={factor}, max_s={max_s}, jitter={jitter})"
        )
    rng = random.Random() if rng is None else rng
    attempt = 0
    while True:
        yield retry_delay(attempt, initial_s=initial_s, factor=factor, max_s=max_s, jitter=jitter, rng=rng)
        attempt += 1


def retry_delay(attempt: int, *, initial_s: float = 0.05, factor: float = 2.0, max_s: float = 5.0,
                jitter: float = 0.5, rng: random.Random | None = None) -> float:
    """The delay before retry number ``attempt`` (from 0): the ``attempt``-th value of :func:`backoff`.

    Stateless, so that a caller can keep just the attempt count (a session that is exported and
    restored elsewhere carries its backoff along).
    """
    if attempt <= 0:
        return 0.0
    rng = random.Random() if rng is None else rng
    cap = _grown(initial_s, factor, attempt - 1, max_s)
    return min(cap, cap * rng.uniform(1 - jitter, 1))


def eject_duration(
    ejections: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """How long a backend stays ejected after its ``ejections``-th ejection in a row (>= 1).

    ``base_s * 2**(ejections - 1)``, capped at ``max_s``, then varied by +-10% so that
    backends ejected together are not all probed together; the result is clipped to
    ``max_s`` again, so it never exceeds it.
    """
    if ejections < 1:
        raise ValueError(f"ejections counts from 1, got {ejections}")
    if base_s < 0 or max_s < 0:
        raise ValueError(f"durations must be >= 0 (got base_s={base_s}, max_s={max_s})")
    rng = random.Random() if rng is None else rng
    cap = _grown(base_s, 2.0, ejections - 1, max_s)
    return min(max_s, cap * rng.uniform(1 - EJECT_JITTER, 1 + EJECT_JITTER))
