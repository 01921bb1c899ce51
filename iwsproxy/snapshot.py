"""A session as bytes: export a :class:`~iwsproxy.session.Session`, restore it elsewhere.  [pure]

:func:`export` writes the complete state of a session; :func:`restore` builds a
new session from it, in this process or another (a restart handing its pipes
over, a proxy evacuating its sessions through a shared store), that behaves as
the original would have. A snapshot may come back from a store the proxy trusts
less than itself, so reading one runs no code (JSON and raw bytes only, no
pickle) and checks every field; anything wrong raises :class:`SnapshotError`.

Layout (version 1)::

    b"IWSS"          4 bytes  magic
    version          2 bytes  big-endian, VERSION
    header length    4 bytes  big-endian
    crc32            4 bytes  big-endian, of everything after these 14 bytes
    header                    a UTF-8 JSON object, below
    payloads                  every buffered message's payload, back to back, in header order

The header::

    {"clock": now,                      # the exporter's clock at export (see Times)
     "settings": {"buffer_limit_bytes": ..., "replay": ..., ...},   # Session's keyword settings
     "session": {"state": "connected", "generation": 1, ...},       # SESSION_FIELDS, "_" stripped
     "to_backend": LEDGER, "to_client": LEDGER,
     "extra": {...}}                    # the caller's, see Extra
    LEDGER = {"sent_total": ..., "acked_total": ..., "next_fence": ..., "last_fence_at": ...,
              "fences": [[number, messages covered, sent at], ...],
              "pending": [[opcode, ...], [length, ...]], "window": [[opcode, ...], [length, ...]]}

Payloads come in this order: to_backend pending, to_backend window, to_client
pending, to_client window. Large messages are not inflated by an encoding.

Times. A session holds times read on its process's monotonic clock. They are
stored as read, with the exporter's clock at export (``clock``, the ``now``
given to :func:`export`); :func:`restore` moves every one by ``now - clock``,
so each deadline keeps its distance from now (a Pong due in 2 s is due in 2 s
after the restore), and a restore at the export's ``now`` gives back the very
same values. Durations (timeouts, a failover's duration) are not moved.

Settings. The snapshot carries the settings the session was made with (the
keyword parameters of ``Session()``, :data:`SETTINGS`). Each one given to
:func:`restore` replaces the snapshot's, so a restart can change settings; each
one not given keeps the snapshot's value. The state stays consistent:

* a lower ``buffer_limit_bytes`` keeps what is held above it and refuses more
  until the buffers drain below it (a new message then closes with 1013);
* ``replay`` turned off (``resume_grace_s`` set to 0) drops the backend's
  (client's) window: what was written and not yet acknowledged is no longer
  kept for a replay, as for a session that started that way;
* timeouts apply from the restore on, to times already held: a detached
  client whose shorter grace has passed is let go at the next ``poll``.

The code's own constants (fences in flight, fence interval) are the restoring
code's. The bytes held are charged to the ``budget`` given to :func:`restore`.

Extra. What the I/O layer holds about a pipe (ids, the chosen subprotocol, the
backend in use...) is not the session's: the caller passes it as ``extra``, a
JSON object, and gets it back from :func:`restore`. Keys of
:data:`EXTRA_FIELDS` are checked for their types on restore, any other key is
returned as stored. Times in ``extra`` are the caller's to make relative.

Trust. Reading a snapshot runs no code, builds only lists, strings and numbers
whose size follows from the snapshot's, and yields a session whose invariants
hold; the checksum catches accidents, not an adversary. Whoever can write a
snapshot can still choose what the session sends, and ``extra`` may hold the
client id, a credential where sessions can be resumed: the store must be as
private as the proxy's own memory.

Adding to a Session. :data:`SESSION_FIELDS`, :data:`LEDGER_FIELDS`,
:data:`BUFFER_FIELDS` and :data:`RECORDS` name every attribute of a session, a
ledger, a buffer and the records they hold with how it is kept;
``tests/unit/test_snapshot.py`` fails when an attribute is missing from them. A change to these tables changes the format:
once a version has been released, bump :data:`VERSION` (a reader refuses
versions it does not know).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable
from itertools import accumulate

from .buffer import Budget, Ledger, Message, MessageBuffer
from .exceptions import BufferOverflow, SnapshotError
from .session import CloseClient, FailoverReport, Session, State

__all__ = ["VERSION", "MAGIC", "export", "restore", "pack", "unpack", "SETTINGS", "SESSION_FIELDS",
           "LEDGER_FIELDS", "BUFFER_FIELDS", "RECORDS", "EXTRA_FIELDS"]

MAGIC = b"IWSS"
VERSION = 1
_PREFIX = struct.Struct("!4sHII")  # magic, version, header length, crc32
DATA_OPCODES = (1, 2)              # text, binary: what a session buffers

# How each attribute is kept. Kinds _READ knows (count, flag, text, text?, seconds, time, time?,
# times, enum, and the RECORDS kinds) are stored in the header under the attribute's name without
# a leading "_"; "setting": in "settings"; "derived": rebuilt by the constructor from the settings;
# "code": the restoring code's constant; "process": the restoring process's (the budget);
# "ledger", "buffer", "fences", "messages": written out below.
SESSION_FIELDS: dict[str, str] = {
    "to_backend": "ledger", "to_client": "ledger",
    "buffer": "derived", "_flow_limit": "derived",
    "replay": "setting", "reconnect_deadline_s": "setting", "pong_timeout_s": "setting",
    "keepalive_s": "setting", "resume_grace_s": "setting", "idle_timeout_s": "setting",
    "state": "enum", "client_side": "enum",
    "backoff_initial_s": "setting", "backoff_max_s": "setting", "backoff_jitter": "setting",
    "backend_url": "text?", "_retry_at": "time?", "_retries": "count", "_avoid": "text?", "_lost_cause": "text",
    "generation": "count", "failovers": "count", "replayed_total": "count", "resumes": "count",
    "_replayed": "count",
    "close_reason": "close?", "end_cause": "text?", "last_failover": "failover?",
    "last_activity": "time", "_waiting_since": "time", "_drain_started": "time", "_detached_at": "time",
    "_excused_until": "times",
}
LEDGER_FIELDS: dict[str, str] = {
    "buffer": "buffer", "keep": "derived", "max_fences": "code", "fence_interval_s": "code",
    "fences": "fences", "sent_total": "count", "acked_total": "count", "next_fence": "count",
    "last_fence_at": "time",
}
BUFFER_FIELDS: dict[str, str] = {
    "limit_bytes": "setting", "budget": "process", "_pending": "messages", "_window": "messages",
    "pending_bytes": "derived", "window_bytes": "derived", "flow_limit_bytes": "derived",
}
#: the records a session holds (frozen dataclasses, stored as JSON objects): kind -> (class, fields)
RECORDS: dict[str, tuple[type, dict[str, str]]] = {
    "close?": (CloseClient, {"code": "count", "reason": "text"}),
    "failover?": (FailoverReport, {"duration_s": "seconds", "replayed": "count", "flushed_messages": "count",
                                   "flushed_bytes": "count", "from_url": "text?", "to_url": "text?",
                                   "cause": "text"}),
}
#: Session()'s keyword settings and their kinds ("seconds": a duration, not moved in time)
SETTINGS: dict[str, str] = {
    "buffer_limit_bytes": "count", "replay": "flag", "reconnect_deadline_s": "seconds",
    "pong_timeout_s": "seconds", "keepalive_s": "seconds", "resume_grace_s": "seconds",
    "idle_timeout_s": "seconds", "backoff_initial_s": "seconds", "backoff_max_s": "seconds",
    "backoff_jitter": "fraction",
}
#: keys of ``extra`` that are checked on restore (each optional), with their kinds: the client's id,
#: the subprotocol it was answered with, the pipe's age, and what the client's handshake asks of
#: every backend (query, subprotocols, headers, origin, address). The backend in use, the one to
#: avoid, and the counts of connections and failovers are the session's own fields.
EXTRA_FIELDS: dict[str, str] = {
    "client_id": "text", "subprotocol": "text?", "age_s": "seconds", "offer": "object",
}
_LEDGER_KEYS = ("fences", "pending", "window")


# ---- value codecs: (encode(value, clock), decode(json, shift, where)) ----

def _fail(where: str, problem: str) -> SnapshotError:
    return SnapshotError(f"{where}: {problem}")


def _int(value, where: str) -> int:
    if type(value) is not int or value < 0:
        raise _fail(where, f"expected an integer >= 0, got {value!r:.40}")
    return value


def _number(value, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _fail(where, f"expected a finite number, got {value!r:.40}")
    return float(value)


def _seconds(value, where: str) -> float:
    value = _number(value, where)
    if value < 0:
        raise _fail(where, f"expected a duration >= 0, got {value!r}")
    return value


def _fraction(value, where: str) -> float:
    value = _number(value, where)
    if not 0 <= value <= 1:
        raise _fail(where, f"expected a fraction from 0 to 1, got {value!r}")
    return value


def _text(value, where: str) -> str:
    if type(value) is not str:
        raise _fail(where, f"expected a string, got {value!r:.40}")
    return value


def _flag(value, where: str) -> bool:
    if type(value) is not bool:
        raise _fail(where, f"expected true or false, got {value!r:.40}")
    return value


def _object(value, where: str) -> dict:
    if type(value) is not dict:
        raise _fail(where, f"expected an object, got {type(value).__name__}")
    return value


def _optional(decode: Callable) -> Callable:
    return lambda value, where: None if value is None else decode(value, where)


def _fixed_list(value, where: str, size: int) -> list:
    if type(value) is not list or len(value) != size:
        raise _fail(where, f"expected a list of {size}, got {value!r:.60}")
    return value


def _times(value, where: str, shift: float) -> dict[str, float]:
    return {key: _number(time, f"{where}.{key}") + shift for key, time in _object(value, where).items()}


# kind -> how a value is written into the header (as it is, if not here)
_WRITE: dict[str, Callable] = {"enum": lambda v: v.value, "times": dict}
# kind -> read(value, where, shift): the value checked, times moved to this process's clock by shift
_READ: dict[str, Callable] = {
    "count": lambda v, w, s: _int(v, w),
    "flag": lambda v, w, s: _flag(v, w),
    "text": lambda v, w, s: _text(v, w),
    "text?": lambda v, w, s: _optional(_text)(v, w),
    "object": lambda v, w, s: _object(v, w),
    "seconds": lambda v, w, s: _seconds(v, w),
    "fraction": lambda v, w, s: _fraction(v, w),
    "seconds?": lambda v, w, s: _optional(_seconds)(v, w),
    "time": lambda v, w, s: _number(v, w) + s,
    "time?": lambda v, w, s: None if v is None else _number(v, w) + s,
    "times": _times,                   # a dict of times, with the keys the constructor gives it
    "enum": lambda v, w, s: _text(v, w),  # a member of the constructor's value's enum, see _decode_fields
}


def _add_record_kind(kind: str, cls: type, fields: dict[str, str]) -> None:
    """Store the optional frozen dataclass ``cls`` (kind ``kind``) as a JSON object of ``fields``."""
    def read(value, where: str, shift: float):
        if value is None:
            return None
        value = _expect_keys(value, fields, where)
        return cls(**{name: _READ[field](value[name], f"{where}.{name}", shift) for name, field in fields.items()})
    _WRITE[kind] = lambda v: None if v is None else {name: _WRITE.get(fields[name], _plain)(getattr(v, name))
                                                     for name in fields}
    _READ[kind] = read


for _kind, (_cls, _fields) in RECORDS.items():
    _add_record_kind(_kind, _cls, _fields)


def _plain(value):
    return value


def _stored(fields: dict[str, str]) -> tuple[tuple[str, str, str], ...]:
    """(attribute, header key, kind) for each attribute of ``fields`` stored under its own key."""
    return tuple((name, name.lstrip("_"), kind) for name, kind in fields.items() if kind in _READ)


_SESSION_STORED = _stored(SESSION_FIELDS)
_LEDGER_STORED = _stored(LEDGER_FIELDS)


def _encode_fields(obj, stored) -> dict:
    return {key: _WRITE.get(kind, _plain)(getattr(obj, name)) for name, key, kind in stored}


def _decode_fields(template, stored, data: dict, where: str, shift: float) -> dict:
    """The checked values of the ``stored`` attributes in ``data``; ``template`` (a new object of
    the same class) gives the enum of each "enum" attribute and the keys of each "times" dict."""
    values = {}
    for name, key, kind in stored:
        here = f"{where}.{key}"
        value = values[name] = _READ[kind](data[key], here, shift)
        like = getattr(template, name)
        if kind == "enum":
            try:
                values[name] = type(like)(value)
            except ValueError:
                raise _fail(here, f"not a {type(like).__name__}: {value!r:.40}") from None
        elif kind == "times" and set(value) != set(like):
            raise _fail(here, f"expected the keys {sorted(like)}, got {sorted(value)}")
    return values


def _expect_keys(data, keys, where: str) -> dict:
    data = _object(data, where)
    if set(data) != set(keys):
        missing, unknown = sorted(set(keys) - set(data)), sorted(set(data) - set(keys))
        raise _fail(where, f"missing {missing}, unknown {unknown}")
    return data


# ---- framing ----

def pack(header: dict, payloads) -> bytes:
    """The bytes of a snapshot: the prefix, ``header`` as JSON, then ``payloads`` (bytes-like).

    Raises :class:`SnapshotError` if ``header`` cannot be written as JSON (a value that is not
    JSON, or a number that is not finite).
    """
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"cannot write the snapshot header: {exc}") from exc
    crc = zlib.crc32(head)
    for payload in payloads:
        crc = zlib.crc32(payload, crc)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(head), crc), head, *payloads])


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def unpack(data) -> tuple[dict, memoryview]:
    """The header (checked to be a JSON object) and the payload bytes of a snapshot.

    Raises :class:`SnapshotError` on a bad magic, an unknown version, a length or checksum that
    does not match (a truncated or corrupted snapshot), or a header that is not a JSON object.
    """
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise SnapshotError(f"truncated: {len(view)} bytes, not even the {_PREFIX.size}-byte prefix")
    magic, version, head_size, crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise SnapshotError(f"not a session snapshot (magic {bytes(magic)!r})")
    if version != VERSION:
        raise SnapshotError(f"unknown snapshot version {version} (this code reads version {VERSION})")
    body = view[_PREFIX.size:]
    if head_size > len(body):
        raise SnapshotError(f"truncated: a {head_size}-byte header in {len(body)} bytes")
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch: the snapshot is truncated or corrupted")
    try:
        header = json.loads(str(body[:head_size], "utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"unreadable header: {exc}") from exc
    return _object(header, "header"), body[head_size:]


# ---- export ----

def _setting(session: Session, name: str):
    return session.to_backend.buffer.limit_bytes if name == "buffer_limit_bytes" else getattr(session, name)


def _encode_ledger(ledger: Ledger, payloads: list) -> dict:
    data = _encode_fields(ledger, _LEDGER_STORED)
    data["fences"] = [list(fence) for fence in ledger.fences]
    for key, messages in (("pending", ledger.buffer._pending), ("window", ledger.buffer._window)):
        data[key] = [[opcode for opcode, _ in messages], [len(payload) for _, payload in messages]]
        payloads.extend(payload for _, payload in messages)
    return data


def export(session: Session, now: float, extra: dict | None = None) -> bytes:
    """The complete state of ``session`` at ``now`` (its clock) as bytes, with ``extra``.

    ``extra`` is a JSON object of the caller's (see the module docstring). Nothing in the
    session changes. Raises :class:`SnapshotError` if ``extra`` is not a JSON object or
    cannot be written as JSON.
    """
    if extra is not None and type(extra) is not dict:
        raise SnapshotError(f"extra must be a dict, got {type(extra).__name__}")
    payloads: list = []
    header = {
        "clock": now,
        "settings": {name: _setting(session, name) for name in SETTINGS},
        "session": _encode_fields(session, _SESSION_STORED),
        "to_backend": _encode_ledger(session.to_backend, payloads),
        "to_client": _encode_ledger(session.to_client, payloads),
        "extra": extra or {},
    }
    return pack(header, payloads)


# ---- restore ----

class _Payloads:
    """Hands out the payloads in ``data`` from byte ``offset`` on, in order, for the
    ``[opcodes, lengths]`` lists of the header."""

    def __init__(self, data: bytes, offset: int):
        self.data, self.offset = data, offset

    def take(self, entry, where: str) -> tuple[list[Message], int]:
        """The messages of one list and their payload bytes."""
        opcodes, lengths = _fixed_list(entry, where, 2)
        if type(opcodes) is not list or type(lengths) is not list or len(opcodes) != len(lengths):
            raise _fail(where, "expected [opcodes, lengths], two lists of the same length")
        if not set(map(type, opcodes)) <= {int} or not set(opcodes) <= set(DATA_OPCODES):
            raise _fail(where, f"opcodes other than the data opcodes {DATA_OPCODES}")
        if lengths and (set(map(type, lengths)) != {int} or min(lengths) < 0):
            raise _fail(where, "lengths must be integers >= 0")
        data, ends = self.data, list(accumulate(lengths, initial=self.offset))
        if ends[-1] > len(data):
            raise _fail(where, f"the payloads end at byte {len(data)}, these at {ends[-1]}")
        messages = [(opcode, data[start:end]) for opcode, start, end in zip(opcodes, ends, ends[1:])]
        self.offset = ends[-1]
        return messages, ends[-1] - ends[0]


def _decode_ledger(template: Ledger, data, where: str, shift: float, payloads: _Payloads,
                   keep: bool, closed: bool) -> dict:
    """The checked state of one ledger (``keep`` and ``closed`` as the snapshot has them)."""
    data = _expect_keys(data, [key for _, key, _ in _LEDGER_STORED] + list(_LEDGER_KEYS), where)
    values = _decode_fields(template, _LEDGER_STORED, data, where, shift)
    pending, pending_bytes = payloads.take(data["pending"], where + ".pending")
    window, window_bytes = payloads.take(data["window"], where + ".window")
    sent, acked = values["sent_total"], values["acked_total"]
    if acked > sent:
        raise _fail(where, f"acked_total {acked} > sent_total {sent}")
    if not keep and (window or acked != sent):
        raise _fail(where, "a ledger that keeps no window has unacknowledged messages")
    if values["next_fence"] < 1:
        raise _fail(where + ".next_fence", "fences are numbered from 1")
    if len(window) > sent - acked or (keep and not closed and len(window) != sent - acked):
        raise _fail(where + ".window", f"{len(window)} messages for {sent - acked} unacknowledged")
    fences = data["fences"]
    if type(fences) is not list:
        raise _fail(where + ".fences", "expected a list")
    checked, last_number, last_covered = [], 0, acked
    for i, fence in enumerate(fences):
        here = f"{where}.fences[{i}]"
        number, covered, sent_at = _fixed_list(fence, here, 3)
        number, covered = _int(number, here), _int(covered, here)
        if not last_number < number < values["next_fence"]:
            raise _fail(here, f"fence {number} out of order (after {last_number}, next {values['next_fence']})")
        if not last_covered <= covered <= sent:
            raise _fail(here, f"covers {covered} messages, not within {last_covered}..{sent}")
        checked.append((number, covered, _number(sent_at, here) + shift))
        last_number, last_covered = number, covered
    values.update(fences=checked, pending=pending, window=window, pending_bytes=pending_bytes,
                  window_bytes=window_bytes)
    return values


def _check_extra(extra) -> dict:
    extra = _object(extra, "extra")
    for key, kind in EXTRA_FIELDS.items():
        if key in extra:
            _READ[kind](extra[key], "extra." + key, 0.0)
    return extra


def _load_ledger(ledger: Ledger, values: dict) -> None:
    buffer: MessageBuffer = ledger.buffer
    for name, _, _ in _LEDGER_STORED:
        setattr(ledger, name, values[name])
    ledger.fences = values["fences"]
    buffer._pending, buffer._window = values["pending"], values["window"]
    buffer.pending_bytes, buffer.window_bytes = values["pending_bytes"], values["window_bytes"]


def restore(data, now: float, *, budget: Budget | None = None, **settings) -> tuple[Session, dict]:
    """A session from :func:`export`'s bytes, at ``now`` (this process's clock), and its ``extra``.

    ``settings`` are ``Session()``'s keyword settings; each one given replaces the snapshot's
    (see the module docstring for how the state is kept consistent). The bytes the session
    holds are charged to ``budget``.

    Raises :class:`SnapshotError` if ``data`` is not a whole, valid snapshot of a version this
    code reads; :class:`BufferOverflow` (scope ``"global"``) if ``budget`` cannot take the
    bytes held (nothing is charged then); :class:`TypeError` for an unknown setting.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    data = bytes(data)  # the payloads are sliced from it (no copy if it is bytes)
    header, view = unpack(data)
    header = _expect_keys(header, ("clock", "settings", "session", "to_backend", "to_client", "extra"),
                          "header")
    shift = now - _number(header["clock"], "clock")
    stored = _expect_keys(header["settings"], SETTINGS, "settings")
    stored = {name: _READ[kind](stored[name], "settings." + name, 0.0) for name, kind in SETTINGS.items()}
    merged = {**stored, **settings}

    # the constructor's session is the one restored (so it has the keys of "times" fields, the derived
    # attributes, the code's constants); a budget is charged only once everything checked out
    template = Session(**merged, now=now, budget=budget)
    as_stored = Session(**stored, now=now)  # what the snapshot's settings derive (which windows it keeps)
    session_data = _expect_keys(header["session"], [key for _, key, _ in _SESSION_STORED], "session")
    values = _decode_fields(template, _SESSION_STORED, session_data, "session", shift)
    closed = values["state"] is State.CLOSED
    payloads = _Payloads(data, len(data) - len(view))
    keeps = (as_stored.to_backend.keep, as_stored.to_client.keep)
    ledgers = [_decode_ledger(getattr(template, name), header[name], name, shift, payloads, keep, closed)
               for name, keep in zip(("to_backend", "to_client"), keeps)]
    if payloads.offset != len(data):
        raise SnapshotError(f"the header accounts for {payloads.offset - len(data) + len(view)} payload "
                            f"bytes, the snapshot has {len(view)}")
    extra = _check_extra(header["extra"])

    new_keeps = (template.to_backend.keep, template.to_client.keep)
    for ledger, kept, keeps_now in zip(ledgers, keeps, new_keeps):
        if kept and not keeps_now:  # the window is no longer kept for a replay; fences stay as probes
            sent = ledger["sent_total"]
            ledger.update(window=[], window_bytes=0, acked_total=sent,
                          fences=[(n, sent, at) for n, _, at in ledger["fences"]])
    held = sum(ledger["pending_bytes"] + ledger["window_bytes"] for ledger in ledgers)
    if budget is not None and not budget.take(held):
        raise BufferOverflow(budget.used_bytes + held, budget.limit_bytes, scope="global")

    session = template
    for name, value in values.items():
        setattr(session, name, value)
    _load_ledger(session.to_backend, ledgers[0])
    _load_ledger(session.to_client, ledgers[1])
    return session, extra
