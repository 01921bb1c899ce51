"""A pipe carried between processes as a session snapshot (:mod:`iwsproxy.snapshot`).

:func:`export_pipe` writes a pipe's session with what the pipe holds beyond it (the snapshot's
``extra``): the client id, the subprotocol the client was answered with, the pipe's age, the
client's offer to every backend, its pool, and the wall-clock time of the export.
:func:`restore_detached` reads such a snapshot in another process (of this host or another) and
returns a session ready for :meth:`PersistentPipe.start_detached
<iwsproxy.io.pipe.PersistentPipe.start_detached>`: its connections stayed behind, so its backend
counts as lost (what it had not acknowledged is replayed to the next one) and its client as
detached (what it had not acknowledged is delivered again when it resumes).

Time at rest. A snapshot's times are on its exporter's monotonic clock; the time between the
export and the restore is taken from the wall clocks of the two processes (``saved_at``), so a
detached client's resume grace keeps running while the snapshot waits in a store. Hosts whose
clocks disagree by more than a small part of the grace shorten or lengthen it by the difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..exceptions import SnapshotError
from ..routes import DEFAULT_POOL
from ..session import Session
from .backend import ClientOffer
from .pipe import session_settings

if TYPE_CHECKING:
    from ..buffer import Budget
    from ..settings import Settings
    from .pipe import PersistentPipe

__all__ = ["Carried", "export_pipe", "restore_detached", "restore_live", "offer_to_json", "offer_from_json"]


@dataclass(frozen=True)
class Carried:
    """What a snapshot carries for its pipe beyond the session."""
    client_id: str
    offer: ClientOffer
    subprotocol: str | None
    age_s: float        # the pipe's age at the export
    pool: str           # the name of the pool it leases from
    rest_s: float       # how long the snapshot waited between its export and this restore


def offer_to_json(offer: ClientOffer) -> dict:
    return {"client_id": offer.client_id, "query": offer.query, "subprotocols": list(offer.subprotocols),
            "headers": [list(header) for header in offer.headers], "origin": offer.origin,
            "remote_addr": offer.remote_addr, "path": offer.path}


def _strings(value, where: str) -> list[str]:
    if type(value) is not list or not all(type(item) is str for item in value):
        raise SnapshotError(f"{where}: expected a list of strings")
    return value


def offer_from_json(data) -> ClientOffer:
    """The :class:`ClientOffer` of :func:`offer_to_json`; raises :class:`SnapshotError` on a value
    of the wrong type or a missing key."""
    if type(data) is not dict:
        raise SnapshotError("extra.offer: expected an object")
    texts = {key: data.get(key) for key in ("client_id", "query", "remote_addr", "path")}
    for key, value in texts.items():
        if type(value) is not str:
            raise SnapshotError(f"extra.offer.{key}: expected a string")
    origin = data.get("origin")
    if origin is not None and type(origin) is not str:
        raise SnapshotError("extra.offer.origin: expected a string or null")
    headers = data.get("headers")
    if type(headers) is not list:
        raise SnapshotError("extra.offer.headers: expected a list")
    pairs = tuple(tuple(_strings(header, "extra.offer.headers")) for header in headers)
    if any(len(pair) != 2 for pair in pairs):
        raise SnapshotError("extra.offer.headers: expected [name, value] pairs")
    return ClientOffer(client_id=texts["client_id"], query=texts["query"],
                       subprotocols=tuple(_strings(data.get("subprotocols"), "extra.offer.subprotocols")),
                       headers=pairs, origin=origin, remote_addr=texts["remote_addr"], path=texts["path"])


def export_pipe(pipe: "PersistentPipe", pool: str = DEFAULT_POOL) -> bytes:
    """The snapshot of ``pipe`` (its session and what :class:`Carried` holds) at this moment.
    Nothing in the pipe changes."""
    extra = {"client_id": pipe.client_id, "subprotocol": pipe.subprotocol,
             "age_s": max(0.0, pipe.clock() - pipe.opened_at), "offer": offer_to_json(pipe.offer),
             "pool": pool, "saved_at": time.time()}
    return pipe.session.export(pipe.clock(), extra)


def restore_detached(data, *, settings: "Settings", budget: "Budget | None", now: float,
                     wall_now: float | None = None) -> tuple[Session, Carried]:
    """The session of a snapshot of :func:`export_pipe`, at ``now`` (this process's monotonic
    clock), with no connection on either side, under this process's ``settings`` (its buffer
    cap, resume grace, timeouts), its bytes charged to ``budget``; and what it carries.

    The session may have ended meanwhile (its resume grace passed at rest, its idle timeout):
    check ``session.closed``, whose bytes are then given back already. ``wall_now`` is
    ``time.time()`` unless given. Raises :class:`SnapshotError` for a snapshot that is not whole
    or valid, carries no client id or offer, or holds an ended session; :class:`BufferOverflow`
    if ``budget`` cannot take its bytes.
    """
    wall_now = time.time() if wall_now is None else wall_now
    header_extra = _peek_extra(data)
    saved_at = header_extra.get("saved_at")
    rest_s = max(0.0, wall_now - saved_at) if type(saved_at) in (int, float) else 0.0
    session, extra = Session.restore(data, now - rest_s, budget=budget, **session_settings(settings))
    try:
        carried = _carried(extra, rest_s)
        if session.closed:
            raise SnapshotError("the snapshot holds a session that has ended")
    except SnapshotError:
        session.close(1011, "snapshot refused")  # gives its bytes back to the budget
        raise
    if session.has_backend:  # its connection stayed with the exporter: what it had not acknowledged goes again
        session.backend_lost(session.generation, now, "moved from another process")
    if session.client_attached:
        session.client_detached(now)  # with the resume grace off this ends the session
    session.poll(now)  # a grace or timeout that ran out while at rest ends it now (no connection to act on)
    return session, carried


def restore_live(data, *, settings: "Settings", budget: "Budget | None", now: float) -> tuple[Session, Carried]:
    """The session of a snapshot of :func:`export_pipe` whose connections come with it (a pipe
    moved to a successor process on the same host: see :mod:`iwsproxy.io.moving`), as it was:
    no time at rest, nothing lost or detached. Under this process's ``settings``, its bytes
    charged to ``budget``. Raises as :func:`restore_detached` does."""
    session, extra = Session.restore(data, now, budget=budget, **session_settings(settings))
    try:
        carried = _carried(extra, 0.0)
        if session.closed:
            raise SnapshotError("the snapshot holds a session that has ended")
    except SnapshotError:
        session.close(1011, "snapshot refused")
        raise
    return session, carried


def _peek_extra(data) -> dict:
    from ..snapshot import unpack
    header, _ = unpack(data)
    extra = header.get("extra")
    return extra if type(extra) is dict else {}


def _carried(extra: dict, rest_s: float) -> Carried:
    client_id = extra.get("client_id")
    if type(client_id) is not str or not client_id:
        raise SnapshotError("extra.client_id: a snapshot of a pipe names its client")
    offer = offer_from_json(extra.get("offer"))
    if offer.client_id != client_id:
        raise SnapshotError("extra.offer.client_id: not the snapshot's client")
    pool = extra.get("pool", DEFAULT_POOL)
    if type(pool) is not str:
        raise SnapshotError("extra.pool: expected a string")
    return Carried(client_id=client_id, offer=offer, subprotocol=extra.get("subprotocol"),
                   age_s=float(extra.get("age_s", 0.0)), pool=pool, rest_s=rest_s)
