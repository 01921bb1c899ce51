"""The failover core without sockets: inputs in, actions out, a fake clock."""

from __future__ import annotations

import pytest

from iwsproxy.buffer import MessageBuffer
from iwsproxy.exceptions import BufferOverflow
from iwsproxy.session import (EXCUSED_WAIT_LIMIT, FENCE_INTERVAL_S, MAX_FENCES_IN_FLIGHT, AbandonBackend, CloseBackend, CloseClient, ConnectBackend, RecordFailover, ReleaseBackend,
                              SendToBackend, Session, State, encode_fence, stuck_peer_to_drop)

from .test_snapshot import RoundTripSession


@pytest.fixture(autouse=True, params=["plain", "roundtrip"])
def _session_kind(request, monkeypatch):
    """Every scenario runs twice: on a Session, and on one exported and restored after every call."""
    if request.param == "roundtrip":
        monkeypatch.setitem(globals(), "Session", RoundTripSession)


def msgs(*names: str) -> list[tuple[int, bytes]]:
    return [(1, n.encode()) for n in names]


def connected(replay: bool = True, limit: int = 1000, **kw) -> Session:
    s = Session(buffer_limit_bytes=limit, replay=replay, now=0.0, **kw)
    assert s.backend_connected(0.0) == (1, [])
    return s


def sent(actions) -> list[bytes]:
    return [p for a in actions if isinstance(a, SendToBackend) for _, p in a.messages]


# ---- buffer ----
def test_buffer_counts_both_halves_against_one_cap():
    buf = MessageBuffer(10)
    buf.add_window(msgs("aaaa"))
    buf.add_pending(msgs("bbbb"))
    with pytest.raises(BufferOverflow):
        buf.add_pending(msgs("ccc"))
    assert (buf.window_bytes, buf.pending_bytes, len(buf)) == (4, 4, 2)  # all or nothing


def test_buffer_rewind_puts_window_before_pending():
    buf = MessageBuffer(100)
    buf.add_window(msgs("w1", "w2"))
    buf.add_pending(msgs("p1"))
    assert buf.ack(1) == 2
    assert buf.rewind() == 1
    assert buf.take_pending(keep=False) == msgs("w2", "p1")
    assert buf.total_bytes == 0


# ---- session ----
def test_each_write_batch_carries_its_own_fence():
    s = connected()
    assert s.client_messages(msgs("a", "b"), 1.0) == [SendToBackend(msgs("a", "b"), fence=1)]
    assert s.client_messages(msgs("c"), 1.1) == [SendToBackend(msgs("c"), fence=2)]
    assert s.buffer.window_count == 3


def test_every_send_action_knows_its_payload_bytes():
    s = Session(buffer_limit_bytes=1000, now=0.0, resume_grace_s=5.0)
    assert s.client_messages(msgs("ab", "cde"), 0.0) == []  # buffered: no backend yet
    _, (flush,) = s.backend_connected(0.1)
    live_up = s.client_messages(msgs("fghi"), 0.2)[0]
    live_down = s.backend_messages(msgs("jk", "l"), 0.3)[0]
    s.client_detached(0.4)
    s.backend_messages(msgs("mnopq"), 0.5)
    (resumed,) = s.client_attached_again(0.6)  # the unacknowledged "jk", "l", then the buffered "mnopq"
    assert [(a.messages, a.nbytes) for a in (flush, live_up, live_down, resumed)] == [
        (msgs("ab", "cde"), 5), (msgs("fghi"), 4), (msgs("jk", "l"), 3), (msgs("jk", "l", "mnopq"), 8)]


def test_pong_acknowledges_what_was_written_before_its_fence():
    s = connected()
    s.client_messages(msgs("a", "b"), 1.0)
    s.client_messages(msgs("c"), 1.1)
    assert s.backend_pong(1, encode_fence(1), 1.2) is False  # fence 2 still out
    assert s.buffer.window_count == 1
    assert s.backend_pong(1, encode_fence(2), 1.3) is False
    assert s.buffer.window_count == 0


def test_a_pong_for_a_later_fence_settles_the_earlier_ones():
    s = connected()
    for i in range(3):
        s.client_messages(msgs(f"m{i}"), 1.0 + i)
    s.backend_pong(1, encode_fence(3), 4.0)  # a backend may answer only the latest ping
    assert s.buffer.window_count == 0
    assert s.next_deadline() == 23.0         # no fence out: next is the keepalive (20 s after the last)


def test_fences_in_flight_are_capped_and_a_due_fence_follows_the_pong():
    s = connected()
    for i in range(MAX_FENCES_IN_FLIGHT):
        assert s.client_messages(msgs(f"m{i}"), 1.0 + i * FENCE_INTERVAL_S)[0].fence == i + 1
    late = 2.0
    assert s.client_messages(msgs("extra"), late) == [SendToBackend(msgs("extra"), fence=None)]
    assert s.backend_pong(1, encode_fence(MAX_FENCES_IN_FLIGHT), late) is True  # "extra" unfenced
    assert s.poll(late) == [SendToBackend([], fence=MAX_FENCES_IN_FLIGHT + 1)]


def test_under_load_one_fence_covers_the_batches_of_an_interval():
    s = connected()
    assert s.client_messages(msgs("a"), 1.0)[0].fence == 1
    assert s.client_messages(msgs("b"), 1.0 + FENCE_INTERVAL_S / 2)[0].fence is None
    assert s.client_messages(msgs("c"), 1.0 + FENCE_INTERVAL_S)[0].fence == 2


def test_no_fence_when_nothing_new_was_written():
    s = connected()
    s.client_messages(msgs("a"), 1.0)
    assert s.poll(1.0) == []  # fence 1 already covers "a"


def test_unknown_or_stale_pongs_are_ignored():
    s = connected()
    s.client_messages(msgs("a"), 1.0)
    assert s.backend_pong(1, b"other", 1.1) is False
    assert s.backend_pong(0, encode_fence(1), 1.1) is False
    assert s.buffer.window_count == 1


@pytest.mark.parametrize("acked", [0, 1, 2])
def test_loss_replays_unacknowledged_then_buffered_then_live(acked):
    s = connected()
    s.client_messages(msgs("m1"), 1.0)                 # fence 1 covers m1
    s.client_messages(msgs("m2"), 1.1)                 # fence 2 covers m2
    if acked:
        s.backend_pong(1, encode_fence(acked), 1.2)
    assert s.backend_lost(1, 2.0) == [AbandonBackend(1, "backend lost")]
    assert s.state is State.FAILING_OVER
    assert s.client_messages(msgs("b1", "b2"), 2.1) == []
    generation, actions = s.backend_connected(3.0)
    expected = ["m1", "m2"][acked:] + ["b1", "b2"]
    assert generation == 2
    assert sent(actions) == [e.encode() for e in expected]
    assert actions[0].fence is not None
    assert sent(s.client_messages(msgs("live"), 3.1)) == [b"live"]
    assert s.failovers == 1
    report = s.last_failover
    assert (report.replayed, report.flushed_messages, report.duration_s) == (2 - acked, 4 - acked, 1.0)


def test_at_most_once_keeps_no_window_and_replays_nothing():
    s = connected(replay=False)
    assert s.client_messages(msgs("a"), 1.0) == [SendToBackend(msgs("a"))]
    assert s.buffer.total_bytes == 0
    s.backend_lost(1, 2.0)
    s.client_messages(msgs("b"), 2.1)
    assert sent(s.backend_connected(3.0)[1]) == [b"b"]


def test_stale_loss_reports_are_ignored():
    s = connected()
    s.backend_lost(1, 1.0)
    s.backend_connected(2.0)
    assert s.backend_lost(1, 2.5) == []
    assert s.state is State.CONNECTED and s.generation == 2


def test_overflow_while_failing_over_closes_with_1013():
    s = connected(limit=10)
    s.backend_lost(1, 1.0)
    assert s.client_messages(msgs("12345"), 1.1) == []
    actions = s.client_messages(msgs("678901"), 1.2)
    assert actions == [CloseClient(1013, "buffer limit of 10 bytes exceeded")]
    assert s.closed and s.buffer.total_bytes == 0


def test_overflow_of_the_window_while_connected_closes_client_and_backend():
    s = connected(limit=4)
    s.client_messages(msgs("abc"), 1.0)
    assert s.client_messages(msgs("de"), 1.1) == [CloseClient(1013, "buffer limit of 4 bytes exceeded"),
                                                  CloseBackend(1, 1000, "client session closed")]


def test_reconnect_deadline():
    s = connected(reconnect_deadline_s=5.0, backoff_initial_s=10.0, backoff_max_s=10.0)
    s.backend_lost(1, 10.0)
    assert s.next_deadline() == 10.0 and s.connect_due(10.0) == ConnectBackend()
    s.connect_failed(10.0)                             # the next round would come after the deadline
    assert s.next_deadline() == 15.0
    assert s.poll(14.9) == []
    assert s.poll(15.0) == [CloseClient(1013, "no backend within 5 s")]


def test_pong_timeout_abandons_the_backend_and_rewinds():
    s = connected(pong_timeout_s=2.0)
    s.client_messages(msgs("a"), 1.0)
    assert s.next_deadline() == 3.0
    assert s.poll(2.9) == []
    assert s.poll(3.0) == [AbandonBackend(1, "no pong within 2 s")]
    assert s.state is State.FAILING_OVER
    assert sent(s.backend_connected(4.0)[1]) == [b"a"]


def test_a_late_answer_is_reported_and_can_be_excused():
    s = Session(buffer_limit_bytes=1000, now=0.0, pong_timeout_s=2.0, resume_grace_s=5.0)
    s.backend_connected(0.0)
    s.client_messages(msgs("up"), 1.0)      # backend fence 1, sent at 1.0
    s.backend_messages(msgs("down"), 1.5)   # client fence 1, sent at 1.5
    assert s.late_answers(2.9) == []
    assert s.late_answers(3.0) == [("backend", 1.0)]
    assert s.late_answers(3.5) == [("backend", 1.0), ("client", 1.5)]
    s.excuse("backend", 3.5)                # its Pong may wait unread behind its data
    s.excuse("client", 3.5)
    assert s.late_answers(5.4) == [] and s.poll(5.4) == []
    assert s.next_deadline() == 5.5
    assert s.late_answers(5.5) == [("backend", 3.5), ("client", 3.5)]  # a new excuse needs news since
    assert s.poll(5.5) == [AbandonBackend(1, "no pong within 2 s"),
                           CloseClient(1001, "client did not answer a ping within 2 s")]


def test_excuses_end_after_a_limit():
    # a backend that streams to a slow client and never reads looks held up for ever
    s = connected(pong_timeout_s=2.0)
    s.client_messages(msgs("a"), 1.0)
    now = 3.0
    while s.excuse("backend", now):
        assert s.poll(now) == [] and s.next_deadline() == now + 2.0
        now += 2.0
    assert now - 1.0 == EXCUSED_WAIT_LIMIT * 2.0
    assert s.poll(now) == [AbandonBackend(1, "no pong within 2 s")]


def test_an_excused_backend_still_settles_with_its_pong():
    s = connected(pong_timeout_s=2.0)
    s.client_messages(msgs("a"), 1.0)
    s.excuse("backend", 3.0)
    s.backend_pong(1, encode_fence(1), 3.2)
    assert s.late_answers(10.0) == [] and s.buffer.window_count == 0


def test_a_window_half_full_asks_the_runner_to_hold_its_sender_back():
    s = Session(buffer_limit_bytes=10, now=0.0, resume_grace_s=5.0)
    s.backend_connected(0.0)
    s.client_messages(msgs("abcd"), 1.0)
    assert not s.backend_window_full()
    s.client_messages(msgs("e"), 1.0)     # 5 of 10 bytes unacknowledged
    assert s.backend_window_full()
    s.backend_pong(1, encode_fence(1), 1.1)
    assert not s.backend_window_full()
    s.backend_messages(msgs("vwxyz"), 1.2)
    assert s.client_window_full()
    s.client_detached(1.3)                  # detached: what it misses is capped, not flow-controlled
    assert not s.client_window_full()
    s.backend_lost(1, 1.4)
    assert not s.backend_window_full()     # no backend: buffered, and capped


def test_keepalive_fence_when_idle():
    s = connected(keepalive_s=20.0)
    assert s.next_deadline() == 20.0
    assert s.poll(19.0) == []
    assert s.poll(20.0) == [SendToBackend([], fence=1)]


def test_client_close_closes_backend_once():
    s = connected()
    assert s.client_closed() == [CloseBackend(1, 1000, "client closed")]
    assert s.client_closed() == []
    assert s.client_messages(msgs("late"), 1.0) == []


def test_backend_ending_the_session_is_forwarded_to_the_client():
    s = connected()
    assert s.backend_closed(1, 1000, "bye", 1.0) == [CloseBackend(1, 1000, "bye"),
                                                     ReleaseBackend(1, "ended the session"), CloseClient(1000, "bye")]
    assert s.closed and s.end_cause == "backend_ended"


def test_backend_connected_in_wrong_state_raises_and_changes_nothing():
    s = connected()
    with pytest.raises(RuntimeError):
        s.backend_connected(1.0)
    assert s.state is State.CONNECTED and s.generation == 1


# ---- planned drain ----
def test_drain_buffers_new_messages_and_acknowledges_the_window_on_close_reply():
    s = connected()
    s.client_messages(msgs("w1", "w2"), 1.0)           # written, never fenced back
    assert s.drain(2.0) == [CloseBackend(1, 1001, "backend draining")]
    assert s.state is State.DRAINING
    assert s.client_messages(msgs("b1"), 2.1) == []    # not written to the draining backend
    assert s.backend_drained(1, 2.5) == [ReleaseBackend(1, "drained")]
    assert s.state is State.FAILING_OVER
    generation, actions = s.backend_connected(3.0)
    assert sent(actions) == [b"b1"]                    # zero duplicates: the Close reply proved w1, w2 read
    assert s.last_failover.duration_s == 1.0 and s.last_failover.replayed == 0


def test_drain_falls_back_to_replay_if_the_backend_dies_first():
    s = connected()
    s.client_messages(msgs("w1"), 1.0)
    s.drain(2.0)
    s.client_messages(msgs("b1"), 2.1)
    assert s.backend_lost(1, 2.2) == [AbandonBackend(1, "backend lost")]
    assert sent(s.backend_connected(3.0)[1]) == [b"w1", b"b1"]


def test_drain_without_close_reply_times_out_into_a_loss():
    s = connected(pong_timeout_s=5.0)
    s.client_messages(msgs("w1"), 1.0)
    s.drain(2.0)
    assert s.next_deadline() == 7.0
    assert s.poll(7.0) == [AbandonBackend(1, "no close reply within 5 s")]
    assert sent(s.backend_connected(8.0)[1]) == [b"w1"]


def test_a_draining_backend_is_excused_for_a_late_close_reply():
    s = connected(pong_timeout_s=2.0)
    s.drain(2.0)
    assert s.late_answers(4.0) == [("backend", 2.0)]
    s.excuse("backend", 4.0)
    assert s.poll(5.9) == [] and s.state is State.DRAINING
    s.backend_drained(1, 5.9)
    s.backend_connected(6.0)
    assert s.last_failover.duration_s == 4.0  # the move began at the drain, not at the excuse


def test_drain_only_from_connected():
    s = connected()
    s.backend_lost(1, 1.0)
    assert s.drain(1.5) == [] and s.state is State.FAILING_OVER
    assert s.backend_drained(1, 1.6) == []


# ---- the decisions the I/O layer only performs ----
@pytest.mark.parametrize("code, outcome", [(1000, "ends"), (4001, "ends"), (4999, "ends"), (1001, "fails over"),
                                           (1011, "fails over"), (1005, "fails over"), (3000, "fails over")])
def test_a_backend_close_ends_the_session_only_for_1000_and_4000_to_4999(code, outcome):
    s = connected()
    actions = s.backend_closed(1, code, "why", 1.0)
    if outcome == "ends":
        assert actions[-1] == CloseClient(code, "why") and s.closed
    else:
        assert actions == [AbandonBackend(1, f"backend closed with {code} why")]
        assert s.state is State.FAILING_OVER


@pytest.mark.parametrize("code, grace, detached", [(1006, 5.0, True), (1001, 5.0, True), (1000, 5.0, False),
                                                   (1006, 0.0, False), (4000, 5.0, False)])
def test_a_client_going_away_or_vanishing_detaches_only_with_resume_on(code, grace, detached):
    s = connected(resume_grace_s=grace)
    actions = s.client_gone(code, 1.0)
    assert s.detaches(code) is detached
    if detached:
        assert actions == [] and not s.client_attached and s.state is State.CONNECTED
    else:
        assert actions == [CloseBackend(1, 1000, "client closed")] and s.closed


def test_the_backend_just_lost_sits_out_one_connect_round():
    s = Session(buffer_limit_bytes=100, now=0.0)
    assert s.connect_due(0.0) == ConnectBackend(None)  # the first round: any backend
    s.backend_connected(0.1, "ws://a")
    s.backend_lost(1, 1.0, "reset")
    assert s.connect_due(1.0) == ConnectBackend(avoid="ws://a")
    assert s.connect_due(1.0) is None                  # one round at a time
    s.connect_failed(1.0)
    assert s.connect_due(2.0) == ConnectBackend(None)  # later rounds try every backend, the lost one too
    s.connect_failed(2.0)
    _, actions = s.backend_connected(2.5, "ws://b")
    assert actions[-1] == RecordFailover(s.last_failover)
    assert (s.last_failover.from_url, s.last_failover.to_url, s.last_failover.cause) == ("ws://a", "ws://b", "reset")


def test_failed_connect_rounds_back_off_with_jitter_up_to_the_cap():
    s = connected(backoff_initial_s=1.0, backoff_max_s=4.0)
    s.backend_lost(1, 0.0)
    now, delays = 0.0, []
    for _ in range(6):
        assert s.connect_due(now) is not None
        s.connect_failed(now)
        delays.append(s.next_deadline() - now)
        assert s.connect_due(now) is None
        now = s.next_deadline()
    caps = [1, 2, 4, 4, 4, 4]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps)), delays


def test_a_pool_change_makes_a_waiting_session_try_at_once():
    s = connected(backoff_initial_s=5.0, backoff_max_s=5.0)
    s.backend_lost(1, 0.0)
    s.connect_due(0.0)
    s.connect_failed(0.0)
    assert s.connect_due(1.0) is None
    s.pool_changed(1.0)
    assert s.connect_due(1.0) == ConnectBackend(None)


def test_the_client_is_dropped_first_when_both_peers_are_stuck():
    assert stuck_peer_to_drop(client_stuck=True, backend_stuck=True) == "client"
    assert stuck_peer_to_drop(client_stuck=False, backend_stuck=True) == "backend"
    assert stuck_peer_to_drop(client_stuck=False, backend_stuck=False) is None


@pytest.mark.parametrize("unread, stalled_at, excused", [(True, 1.5, True), (False, 1.5, False), (True, 0.5, False)])
def test_a_late_answer_is_excused_only_with_bytes_unread_and_the_other_side_held_up(unread, stalled_at, excused):
    s = connected(pong_timeout_s=2.0)
    s.client_messages(msgs("a"), 1.0)                  # fence 1 at 1.0
    (side, since), = s.late_answers(3.0)
    assert s.excuse_if_held_up(side, since, 3.0, unread=unread, other_stalled_at=stalled_at) is excused
    assert (s.poll(3.0) == []) is excused
