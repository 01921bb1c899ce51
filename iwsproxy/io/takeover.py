"""A restart's pipes, both ends: moving every pipe of this process out, and building a moved pipe in.

The predecessor's side: :func:`move_all` asks each pipe to move
(:meth:`~iwsproxy.io.moving.Movable.move`), and :func:`pool_state` says which backends its
pools hold (changes made through the admin API included). The successor's side:
:func:`adopt_pools` applies that, and :func:`restore_moved` rebuilds one pipe's session and its
two live connections (on the descriptors that came with it, their parser state loaded) for
:meth:`PipeManager.adopt_moved <iwsproxy.io.manager.PipeManager.adopt_moved>`. The channel
between the two processes is :mod:`iwsproxy.io.handover`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gevent.pool import Pool

from ..exceptions import BufferOverflow, SnapshotError
from ..pool import Backend
from ..session import Session
from .backend import BackendConnection
from .carry import Carried, restore_live
from .connection import Connection

if TYPE_CHECKING:
    from ..buffer import Budget
    from ..frames import MaskSource
    from ..settings import Settings

__all__ = ["move_all", "pool_state", "adopt_pools", "restore_moved", "Moved", "MoveRefused"]

log = logging.getLogger(__name__)

MOVE_CONCURRENCY = 64  # pipes being moved at once (each waits for the successor's answer)
MOVE_ROUNDS = 5        # pipes that were busy (a reader with data in hand) are asked again this often
RETRY_PAUSE_S = 0.05


class MoveRefused(Exception):
    """Internal to the I/O layer: a moved pipe's state cannot be used here (a version this code
    does not read, a pool it does not have, a budget that cannot take its bytes)."""


def move_all(manager, pipes: list, send, refused) -> dict:
    """Move ``pipes`` with ``send(state, fds) -> bool``, :data:`MOVE_CONCURRENCY` at a time;
    those that were busy are asked again, up to :data:`MOVE_ROUNDS` times. A pipe whose session
    is ending stays (it ends here); one refused is added to ``refused`` (a set) and not asked
    again. Returns counts by outcome: ``moved``, ``refused``, ``ending``, ``later`` (still here,
    busy every time). Stops early when a round moved nothing and was refused (the successor
    is gone or refuses everything)."""
    counts: Counter = Counter()
    for _ in range(MOVE_ROUNDS):
        asked = [p for p in pipes if p not in refused and not p.ending]
        if not asked:
            break
        outcomes = Pool(MOVE_CONCURRENCY).map(lambda p: (p, p.move(send).get()), asked)
        round_counts = Counter(outcome for _, outcome in outcomes)
        refused.update(p for p, outcome in outcomes if outcome == "refused")
        counts["moved"] += round_counts["moved"]
        manager.counters["pipes_moved_out"] += round_counts["moved"]
        for _ in range(round_counts["moved"]):
            manager.metrics.handover("pipes_moved_out")
        if not round_counts["later"] or (not round_counts["moved"] and round_counts["refused"]):
            break
        manager._closing.wait(RETRY_PAUSE_S)  # ok-sleep: pacing before asking busy pipes again
    left = [p for p in pipes if not p.ending]
    counts["refused"] = sum(1 for p in left if p in refused)
    counts["later"] = len(left) - counts["refused"]
    counts["ending"] = len(pipes) - len(left) - counts["moved"]
    return dict(counts)


def pool_state(manager) -> dict:
    """Each pool's backends in order, ``[url, draining]``."""
    now = time.monotonic()
    return {name: [[b["url"], b["state"] == "draining"] for b in leases.pool.snapshot(now)]
            for name, leases in manager.leases.items()}


def adopt_pools(manager, pools: dict) -> None:
    """Take over a predecessor's backends (:func:`pool_state`): those this process's
    configuration lacks (added through the admin API) are added, those it was draining are
    drained. Pools this process does not have are skipped (logged)."""
    for name, backends in pools.items():
        if name not in manager.leases:
            log.warning("handover: the predecessor's pool %r is not configured here", name)
            continue
        for url, draining in backends:
            manager.apply_add(url, name)
            if draining:
                manager.leases[name].pool.drain(url)


@dataclass
class Moved:
    """A moved pipe, rebuilt: its session, what it carries, its connections (None: detached, or
    no backend connection moved) and this process's lease of the backend (None if the pool
    does not know it)."""
    session: Session
    carried: Carried
    client: Connection | None
    backend: BackendConnection | None
    lease: Backend | None


def restore_moved(state: dict, fds: list[int], *, settings: "Settings", budget: "Budget | None",
                  mask_source: "MaskSource", pools: dict) -> Moved:
    """Rebuild a pipe from ``state`` (see :meth:`Movable._export_for_move
    <iwsproxy.io.moving.Movable._export_for_move>`) and ``fds`` (its client's, then its
    backend's descriptor, as named there), under this process's ``settings``, its bytes charged
    to ``budget``, leasing from ``pools`` (by name). Reads nothing from the descriptors.

    Raises :class:`MoveRefused` if it cannot: the descriptors are then not taken (the caller
    closes them) and nothing is charged."""
    try:
        session, carried = restore_live(state["snapshot"], settings=settings, budget=budget, now=time.monotonic())
    except (SnapshotError, BufferOverflow, KeyError, TypeError) as exc:
        raise MoveRefused(str(exc)) from exc
    client = backend = None
    try:
        leases = pools[carried.pool]
        if len(fds) != (state["client"] is not None) + (state["backend"] is not None):
            raise ValueError("descriptors missing")
        if state["client"] is not None:
            client = Connection(socket.socket(fileno=fds[0]), server_side=True,
                                max_message_size=settings.max_message_size_bytes,
                                max_fragments=settings.max_fragments)
            client.load_state(state["client"])
        if state["backend"] is not None:
            info = state["backend"]
            backend = BackendConnection(info["url"], socket.socket(fileno=fds[-1]), info["subprotocol"],
                                        max_message_size=settings.max_message_size_bytes,
                                        max_fragments=settings.max_fragments, mask_source=mask_source)
            backend.load_state(info)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        session.close(1012, "not moved")  # gives its bytes back to the budget
        for conn in (client, backend):
            if conn is not None:
                conn.sock.detach()  # the caller closes the descriptors
        raise MoveRefused(f"a state this version cannot use: {exc!r}") from exc
    lease = leases.pool.get(backend.url) if backend is not None else None
    if lease is not None:
        lease.clients += 1
    return Moved(session, carried, client, backend, lease)
