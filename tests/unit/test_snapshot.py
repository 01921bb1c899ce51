"""Session snapshots: every attribute covered, restored sessions behave as the original, bad bytes refused."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import struct
import zlib

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from iwsproxy import snapshot
from iwsproxy.buffer import Budget, Ledger, MessageBuffer
from iwsproxy.exceptions import BufferOverflow, SnapshotError
from iwsproxy.session import CloseBackend, CloseClient, SendToBackend, SendToClient, Session, State, encode_fence


def msgs(*names: str) -> list[tuple[int, bytes]]:
    return [(1, n.encode()) for n in names]


def held(session: Session) -> int:
    return session.to_backend.buffer.total_bytes + session.to_client.buffer.total_bytes


def state_of(value):
    """Everything a session holds, as nested plain values (the budget by identity)."""
    if isinstance(value, Budget):
        return ("budget", id(value))
    if isinstance(value, (Session, Ledger, MessageBuffer)):
        names = vars(value) if hasattr(value, "__dict__") else type(value).__slots__
        return {name: state_of(getattr(value, name)) for name in names}
    if isinstance(value, (list, tuple)):
        return [state_of(item) for item in value]
    if isinstance(value, dict):
        return {key: state_of(item) for key, item in value.items()}
    return value


class RoundTripSession:
    """A :class:`Session` exported and restored (at the same clock) after every method called on
    it; each restore must export the same bytes and hold the same state as the session it replaces."""

    def __init__(self, **kwargs):
        self._now = kwargs["now"]
        self._session = Session(**kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._session, name)
        if not inspect.ismethod(value):
            return value

        def call(*args, **kwargs):
            now = inspect.signature(value).bind(*args, **kwargs).arguments.get("now", self._now)
            try:
                return value(*args, **kwargs)
            finally:
                self._now = now
                self._roundtrip()
        return call

    def _roundtrip(self) -> None:
        old, now = self._session, self._now
        data = old.export(now)
        budget = old.to_backend.buffer.budget
        if budget is not None:
            budget.give(held(old))  # the old session is dropped; the new one is charged
        new, extra = Session.restore(data, now, budget=budget)
        assert extra == {}
        assert new.export(now) == data
        assert state_of(new) == state_of(old)
        self._session = new


def busy_session() -> Session:
    """Messages pending and in the window both ways, fences out, a failover behind it."""
    s = Session(buffer_limit_bytes=1000, now=10.0, resume_grace_s=5.0, pong_timeout_s=2.0)
    s.client_messages(msgs("early"), 10.1)        # pending: no backend yet
    s.backend_connected(10.2)                      # flushed into the window, fence 1
    s.backend_lost(1, 10.25)
    s.backend_connected(10.3)                      # a failover: "early" replayed
    s.client_messages([(2, b"\x00\xff")], 10.35)   # fence 2
    s.backend_messages(msgs("down1"), 10.4)        # the client's window, fence 1
    s.backend_messages(msgs("down2"), 10.5)        # fence 2
    s.client_pong(encode_fence(1), 10.6)
    s.excuse("backend", 12.3)
    return s


# ---- the format covers everything ----
def test_the_format_names_every_attribute_of_a_session_its_ledgers_and_buffers():
    s = busy_session()
    tables = [("Session", set(Session.__slots__), snapshot.SESSION_FIELDS),
              ("Ledger", set(Ledger.__slots__), snapshot.LEDGER_FIELDS),
              ("MessageBuffer", set(MessageBuffer.__slots__), snapshot.BUFFER_FIELDS)]
    for cls, attributes, table in tables:
        missing, gone = sorted(attributes - set(table)), sorted(set(table) - attributes)
        assert not missing, f"{cls} has attributes a snapshot does not keep: add {missing} to iwsproxy/snapshot.py"
        assert not gone, f"iwsproxy/snapshot.py names attributes {cls} no longer has: {gone}"
    for kind, (cls, fields) in snapshot.RECORDS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(fields), f"{cls.__name__} has {sorted(names)}, RECORDS[{kind!r}] {sorted(fields)}"
    settings_ = set(inspect.signature(Session).parameters) - {"now", "budget"}
    assert settings_ == set(snapshot.SETTINGS), f"Session() takes {sorted(settings_)}, SETTINGS {sorted(snapshot.SETTINGS)}"


def test_every_kind_in_the_tables_is_known():
    known = set(snapshot._READ) | {"setting", "derived", "code", "process", "ledger", "buffer", "fences",
                                     "messages"}
    for table in (snapshot.SESSION_FIELDS, snapshot.LEDGER_FIELDS, snapshot.BUFFER_FIELDS):
        assert set(table.values()) <= known


def test_a_restored_session_holds_the_same_state_and_exports_the_same_bytes():
    s = busy_session()
    data = s.export(13.0, extra={"client_id": "c1", "subprotocol": None, "age_s": 1.5, "anything": [1]})
    r, extra = Session.restore(data, 13.0)
    assert state_of(r) == state_of(s)
    assert r.export(13.0, extra) == data
    assert extra == {"client_id": "c1", "subprotocol": None, "age_s": 1.5, "anything": [1]}
    assert r.buffer is r.to_backend.buffer
    assert type(r.to_backend.buffer._window[1][1]) is bytes


def test_large_payloads_are_stored_as_they_are():
    s = Session(buffer_limit_bytes=8 << 20, now=0.0)
    payload = bytes(range(256)) * 4096  # 1 MiB
    s.client_messages([(2, payload)] * 5, 0.0)
    data = s.export(0.0)
    assert len(data) < 5 * len(payload) + 1024
    r, _ = Session.restore(data, 0.0)
    assert r.to_backend.buffer.take_pending(keep=False) == [(2, payload)] * 5


def test_a_closed_session_round_trips():
    s = busy_session()
    s.close(1001, "shutdown")
    r, _ = Session.restore(s.export(20.0), 20.0)
    assert r.closed and r.close_reason == CloseClient(1001, "shutdown") and r.end_cause == "proxy"
    assert r.poll(30.0) == [] and r.client_messages(msgs("x"), 30.0) == []


# ---- times ----
def test_times_keep_their_distance_from_now_on_another_clock():
    s = busy_session()
    deadline, late = s.next_deadline(), s.late_answers(14.3)
    r, _ = Session.restore(s.export(13.0), 1013.0)
    assert r.next_deadline() == pytest.approx(deadline + 1000.0)
    assert r.late_answers(1014.3) == [(side, pytest.approx(t + 1000.0)) for side, t in late]
    back, _ = Session.restore(r.export(1013.0), 13.0)
    assert back.next_deadline() == pytest.approx(deadline)


def test_a_detached_client_keeps_the_rest_of_its_grace():
    s = Session(buffer_limit_bytes=100, now=0.0, resume_grace_s=5.0)
    s.backend_connected(0.0)
    s.client_detached(1.0)
    r, _ = Session.restore(s.export(4.0), 100.0)   # 3 s of the 5 s gone
    assert r.poll(101.9) == []
    assert r.poll(102.0) == [CloseBackend(1, 1000, "client session closed")]
    assert r.end_cause == "grace_expired"


# ---- the budget ----
def test_the_bytes_held_are_charged_to_the_budget():
    s = busy_session()
    budget = Budget(1000)
    r, _ = Session.restore(s.export(13.0), 13.0, budget=budget)
    assert budget.used_bytes == held(s) > 0
    r.close(1001, "bye")
    assert budget.used_bytes == 0


def test_a_budget_without_room_refuses_the_restore_and_is_not_charged():
    s = busy_session()
    budget = Budget(held(s) - 1)
    with pytest.raises(BufferOverflow) as info:
        Session.restore(s.export(13.0), 13.0, budget=budget)
    assert info.value.scope == "global" and budget.used_bytes == 0


# ---- settings ----
def test_settings_given_to_restore_replace_the_snapshots():
    s = busy_session()
    r, _ = Session.restore(s.export(13.0), 13.0, pong_timeout_s=7.0, keepalive_s=1.0)
    assert (r.pong_timeout_s, r.keepalive_s, r.resume_grace_s) == (7.0, 1.0, 5.0)
    with pytest.raises(TypeError):
        Session.restore(s.export(13.0), 13.0, no_such_setting=1)


def test_a_lower_buffer_limit_keeps_what_is_held_and_refuses_more():
    s = Session(buffer_limit_bytes=100, now=0.0)
    s.client_messages([(2, b"x" * 60)], 0.0)
    r, _ = Session.restore(s.export(1.0), 1.0, buffer_limit_bytes=50)
    assert r.buffer.pending_bytes == 60
    assert r.client_messages(msgs("y"), 1.0) == [CloseClient(1013, "buffer limit of 50 bytes exceeded")]


def test_replay_turned_off_drops_the_backends_window():
    s = Session(buffer_limit_bytes=100, now=0.0)
    s.backend_connected(0.0)
    s.client_messages(msgs("written"), 0.1)
    s.backend_lost(1, 0.2)
    s.client_messages(msgs("waiting"), 0.3)
    s.backend_connected(0.4)                       # "written", "waiting" in the window again
    s.client_messages(msgs("w2"), 0.5)
    budget = Budget(1000)
    r, _ = Session.restore(s.export(1.0), 1.0, budget=budget, replay=False)
    assert r.buffer.total_bytes == 0 and budget.used_bytes == 0
    assert r.backend_pong(2, encode_fence(1), 1.1) is False   # the fences stay, as liveness probes
    r.backend_lost(2, 1.2)
    assert [a for a in r.backend_connected(1.3)[1] if isinstance(a, SendToBackend)] == []
    again, _ = Session.restore(r.export(1.4), 1.4)
    assert again.replay is False


def test_resume_turned_off_lets_a_detached_client_go_at_the_next_poll():
    s = Session(buffer_limit_bytes=100, now=0.0, resume_grace_s=30.0)
    s.backend_connected(0.0)
    s.backend_messages(msgs("unread"), 0.1)
    s.client_detached(0.2)
    s.backend_messages(msgs("missed"), 0.3)
    r, _ = Session.restore(s.export(1.0), 1.0, resume_grace_s=0.0)
    assert r.poll(1.0) == [CloseBackend(1, 1000, "client session closed")]
    assert r.end_cause == "grace_expired" and r.to_client.buffer.total_bytes == 0


def test_resume_turned_off_drops_an_attached_clients_window():
    s = Session(buffer_limit_bytes=100, now=0.0, resume_grace_s=30.0)
    s.backend_connected(0.0)
    s.backend_messages(msgs("unacked"), 0.1)
    r, _ = Session.restore(s.export(1.0), 1.0, resume_grace_s=0.0)
    assert r.to_client.buffer.total_bytes == 0
    assert r.backend_messages(msgs("live"), 1.1) == [SendToClient(msgs("live"))]
    Session.restore(r.export(1.2), 1.2)


# ---- extra ----
@pytest.mark.parametrize("extra", [{"client_id": 5}, {"age_s": -1}, {"subprotocol": 3},
                                   {"subprotocol": ["chat"]}, {"offer": "q=1"}])
def test_known_extra_keys_are_checked_on_restore(extra):
    s = Session(buffer_limit_bytes=10, now=0.0)
    data = s.export(0.0, extra)
    with pytest.raises(SnapshotError, match="extra"):
        Session.restore(data, 0.0)


@pytest.mark.parametrize("extra", [{"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_an_extra_that_is_not_a_json_object_cannot_be_exported(extra):
    with pytest.raises(SnapshotError):
        Session(buffer_limit_bytes=10, now=0.0).export(0.0, extra)


# ---- bad bytes ----
def reseal(header, payload: bytes = b"") -> bytes:
    """A snapshot with a valid prefix and checksum around ``header`` (a dict, or raw JSON bytes)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    crc = zlib.crc32(payload, zlib.crc32(head))
    return struct.pack("!4sHII", snapshot.MAGIC, snapshot.VERSION, len(head), crc) + head + payload


def test_every_truncation_is_refused():
    data = busy_session().export(13.0)
    for size in range(len(data)):
        with pytest.raises(SnapshotError):
            Session.restore(data[:size], 13.0)
    with pytest.raises(SnapshotError):
        Session.restore(data + b"\x00", 13.0)


def test_every_corrupted_byte_is_refused():
    data = busy_session().export(13.0)
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x20
        with pytest.raises(SnapshotError):
            Session.restore(bytes(corrupt), 13.0)


def test_bad_magic_and_unknown_versions_say_so():
    data = busy_session().export(13.0)
    with pytest.raises(SnapshotError, match="not a session snapshot"):
        Session.restore(b"JUNK" + data[4:], 13.0)
    with pytest.raises(SnapshotError, match="unknown snapshot version 2"):
        Session.restore(data[:4] + b"\x00\x02" + data[6:], 13.0)


def _opcodes(h):
    return h["to_backend"]["window"][0]


def _lengths(h):
    return h["to_backend"]["window"][1]


MUTATIONS = {
    "unknown state": lambda h: h["session"].update(state="flying"),
    "negative counter": lambda h: h["session"].update(generation=-1),
    "bool for a counter": lambda h: h["session"].update(failovers=True),
    "missing field": lambda h: h["session"].pop("resumes"),
    "unknown field": lambda h: h["session"].update(surprise=1),
    "missing section": lambda h: h.pop("to_client"),
    "clock not a number": lambda h: h.update(clock="now"),
    "negative timeout": lambda h: h["settings"].update(pong_timeout_s=-1),
    "setting of the wrong type": lambda h: h["settings"].update(replay="yes"),
    "time missing": lambda h: h["to_backend"].update(last_fence_at=None),
    "not a data opcode": lambda h: _opcodes(h).__setitem__(0, 9),
    "bool opcode": lambda h: _opcodes(h).__setitem__(0, True),
    "lengths past the payloads": lambda h: _lengths(h).__setitem__(0, _lengths(h)[0] + 1),
    "lengths short of the payloads": lambda h: _lengths(h).__setitem__(0, _lengths(h)[0] - 1),
    "negative length": lambda h: _lengths(h).__setitem__(0, -1),
    "float length": lambda h: _lengths(h).__setitem__(0, 5.0),
    "more lengths than opcodes": lambda h: _lengths(h).append(0),
    "message lists malformed": lambda h: h["to_backend"].update(window=[[1, 2]]),
    "window beyond what is unacknowledged": lambda h: h["to_backend"].update(sent_total=5),
    "acked beyond sent": lambda h: h["to_backend"].update(acked_total=99),
    "fences out of order": lambda h: h["to_backend"]["fences"].reverse(),
    "fence not issued yet": lambda h: h["to_backend"].update(next_fence=1),
    "fence covering too much": lambda h: h["to_backend"]["fences"][-1].__setitem__(1, 99),
    "close reason malformed": lambda h: h["session"].update(close_reason=[1000, "bye"]),
    "close reason incomplete": lambda h: h["session"].update(close_reason={"code": 1000}),
    "close reason of the wrong type": lambda h: h["session"].update(close_reason={"code": "1000", "reason": ""}),
    "excuses of unknown sides": lambda h: h["session"].update(excused_until={"backend": 0.0}),
    "failover report malformed": lambda h: h["session"]["last_failover"].update(replayed=-1),
    "extra not an object": lambda h: h.update(extra=[]),
    "window kept without replay": lambda h: h["settings"].update(replay=False),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_an_inconsistent_header_is_refused(name):
    header, payload = snapshot.unpack(busy_session().export(13.0))
    assert len(_lengths(header)) == 2 and len(header["to_backend"]["fences"]) == 2
    header = copy.deepcopy(header)
    MUTATIONS[name](header)
    with pytest.raises(SnapshotError):
        Session.restore(reseal(header, bytes(payload)), 13.0)


@pytest.mark.parametrize("head", [b'{"clock": NaN}', b'{"clock": 1e999}', b"[" * 100_000 + b"]" * 100_000,
                                  b'{"clock": ' + b"9" * 10_000 + b"}", b"\xff\xfe", b"[]", b""])
def test_a_header_that_is_not_a_valid_json_object_is_refused(head):
    with pytest.raises(SnapshotError):
        Session.restore(reseal(head), 0.0)


def test_payload_bytes_the_header_does_not_account_for_are_refused():
    header, payload = snapshot.unpack(busy_session().export(13.0))
    with pytest.raises(SnapshotError, match="payload bytes"):
        Session.restore(reseal(header, bytes(payload) + b"?"), 13.0)


# ---- restored sessions behave as the original: random input sequences ----
# Times are multiples of 1/1024 s and clock offsets whole seconds, so both clocks compute exactly.
_messages = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=12)), min_size=1, max_size=4)
_dts = st.sampled_from([0.0, 1 / 1024, 1 / 256, 0.5, 1.0, 2.0, 8.0])
_offsets = st.sampled_from([0.0, 1024.0, -4096.0, 65536.0])
_configs = st.fixed_dictionaries({
    "buffer_limit_bytes": st.sampled_from([64, 1000, 1000]), "replay": st.booleans(),
    "reconnect_deadline_s": st.sampled_from([0.0, 4.0]), "pong_timeout_s": st.sampled_from([0.0, 2.0, 10.0]),
    "keepalive_s": st.sampled_from([0.0, 3.0]), "resume_grace_s": st.sampled_from([0.0, 5.0]),
    "idle_timeout_s": st.sampled_from([0.0, 30.0]),
    "backoff_jitter": st.just(0.0)})  # the copies must draw the same retry delays


def apply(s: Session, op: tuple, now: float):
    """Feed ``op`` to ``s`` at ``now``; what it returns (or the RuntimeError it raises)."""
    name, *args = op
    try:
        if name in ("client_messages", "backend_messages"):
            return getattr(s, name)(args[0], now)
        if name == "backend_pong":
            return s.backend_pong(s.generation, encode_fence(args[0]), now)
        if name == "client_pong":
            return s.client_pong(encode_fence(args[0]), now)
        if name in ("backend_lost", "backend_drained"):
            return getattr(s, name)(s.generation, now)
        if name == "stale_lost":
            return s.backend_lost(s.generation - 1, now)
        if name.startswith("excuse_"):
            return s.excuse(name[len("excuse_"):], now)
        if name == "close":
            return s.close(1000, "bye")
        if name == "backend_ended_session":
            return s.backend_closed(s.generation, 1000, "bye", now)
        if name == "backend_closed_1006":
            return s.backend_closed(s.generation, 1006, "", now)
        if name == "client_gone":
            return s.client_gone(1006, now)
        if name == "connect_due":
            return s.connect_due(now)
        if name in ("connect_failed", "pool_changed"):
            return getattr(s, name)(now)
        if name == "backend_connected_url":
            return s.backend_connected(now, "ws://b%d" % s.generation)
        if name == "client_closed":
            return s.client_closed()
        if name == "window_full":
            return s.backend_window_full(), s.client_window_full()
        return getattr(s, name)(now)
    except RuntimeError as exc:
        return ("raised", str(exc))


# rare enough that most runs get far before an input ends the session
_OTHER_INPUTS = ["poll", "backend_lost", "drain", "backend_drained", "client_detached", "client_attached_again",
                 "late_answers", "stale_lost", "excuse_backend", "excuse_client", "window_full", "client_gone",
                 "connect_due", "connect_failed", "pool_changed", "backend_closed_1006", "backend_connected_url"] * 3 + [
                 "close", "client_closed", "backend_ended_session"]


class RestoredSessionBehavesAsTheOriginal(RuleBasedStateMachine):
    """The same inputs to a session and to one exported and restored before every input, at a
    clock ``offset`` ahead of the original's (0 or not): the same actions and deadlines, and with
    the same clock the same state."""

    @initialize(config=_configs, other_clocks=st.booleans(), connect=st.booleans())
    def start(self, config, other_clocks, connect):
        self.now, self.offset, self.other_clocks = 5000.0, 0.0, other_clocks
        self.original, self.restored = Session(now=self.now, **config), Session(now=self.now, **config)
        if connect:  # whichever rules this run leaves out (swarm testing), it has a backend to lose
            self.step(("backend_connected",), 0.0, 0.0)

    def step(self, op: tuple, dt: float, offset: float) -> None:
        offset = offset if self.other_clocks else 0.0
        self.restored, _ = Session.restore(self.restored.export(self.now + self.offset), self.now + offset)
        self.offset, self.now = offset, self.now + dt
        expected, got = apply(self.original, op, self.now), apply(self.restored, op, self.now + offset)
        # times on a clock shifted by ``offset`` come back equal up to float rounding (clock - offset)
        if op[0] == "late_answers":
            got = [(side, pytest.approx(since - offset, abs=1e-6)) for side, since in got]
        assert got == expected
        deadline, original = self.restored.next_deadline(), self.original.next_deadline()
        if deadline is None or original is None:
            assert deadline is original
        else:
            assert deadline - offset == pytest.approx(original, abs=1e-6)
        assert self.restored.last_failover == self.original.last_failover
        if not self.other_clocks:
            assert state_of(self.restored) == state_of(self.original)

    @rule(name=st.sampled_from(["client_messages", "backend_messages"]), messages=_messages, dt=_dts,
          offset=_offsets)
    def messages(self, name, messages, dt, offset):
        self.step((name, messages), dt, offset)

    @rule(name=st.sampled_from(["backend_pong", "client_pong"]), fence=st.integers(0, 8), dt=_dts, offset=_offsets)
    def pong(self, name, fence, dt, offset):
        self.step((name, fence), dt, offset)

    @rule(dt=_dts, offset=_offsets)
    def backend_connected(self, dt, offset):
        self.step(("backend_connected",), dt, offset)

    @rule(name=st.sampled_from(_OTHER_INPUTS), dt=_dts, offset=_offsets)
    def other(self, name, dt, offset):
        self.step((name,), dt, offset)


# no shrinking: each step restores a session, so shrinking a failure would take minutes; the report
# lists every step of the failing run
RestoredSessionBehavesAsTheOriginal.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate])
test_a_session_restored_before_every_input_behaves_as_the_original = RestoredSessionBehavesAsTheOriginal.TestCase


def test_send_actions_from_a_restored_session_count_their_bytes():
    s = Session(buffer_limit_bytes=100, now=0.0)
    s.client_messages(msgs("abc", "de"), 0.0)
    r, _ = Session.restore(s.export(0.0), 0.0)
    (flush,) = r.backend_connected(0.1)[1]
    assert flush == SendToBackend(msgs("abc", "de"), 1) and flush.nbytes == 5
    assert r.state is State.CONNECTED
