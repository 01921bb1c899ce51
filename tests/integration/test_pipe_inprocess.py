"""A pipe's own rules, checked in-process (no proxy process, no manager): clients on socket
pairs, backends served by greenlets of this process, a real pool, and a clock the test moves
(see inprocess.Rig). Process-level tests keep what needs a real kill or a real server."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket as gsocket

from inprocess import WAIT_S, Rig, make_pipe, reconnects

from iwsproxy.frames import OP_CLOSE, FrameParser
from iwsproxy.io.connection import Connection
from iwsproxy.io.events import PerformAsked
from iwsproxy.io.pipe import CLOSE_TAKEN_OVER
from iwsproxy.session import CloseBackend, CloseClient


def _pair(server_side: bool):
    ours, peer = gsocket.socketpair()
    peer.settimeout(5)
    return Connection(ours, server_side=server_side, max_message_size=1 << 20), peer


def _frames(peer, parser: FrameParser, count: int) -> list:
    got: list = []
    while len(got) < count:
        got += parser.feed(peer.recv(4096))
    return got


def test_an_action_for_a_side_whose_lock_is_not_held_goes_to_the_supervisor():
    pipe = make_pipe()
    pipe.client, client_peer = _pair(server_side=True)
    pipe.backend, backend_peer = _pair(server_side=False)
    posted: list = []
    pipe._post = posted.append
    try:
        with pipe._locks.client:  # as the backend reader holds it when the client's buffer overflows
            pipe._perform([CloseClient(1013, "full"), CloseBackend(1, 1000, "client session closed")])
        assert _frames(client_peer, FrameParser(expect_masked=False), 1) == [(OP_CLOSE, b"\x03\xf5full")]
        assert posted == [PerformAsked((CloseBackend(1, 1000, "client session closed"),))]
        assert not pipe.backend.close_sent  # nothing written to the backend without its lock
        pipe._handle(posted.pop())          # the supervisor takes the lock and performs it
        assert _frames(backend_peer, FrameParser(expect_masked=True), 1) == [
            (OP_CLOSE, b"\x03\xe8client session closed")]
    finally:
        pipe.client.abort()
        pipe.backend.abort()
        client_peer.close()
        backend_peer.close()


# ---- the runtime on a clock the test moves ----

TEST_S = 10  # each test below takes well under a second; none waits for real time to pass but
             # the stuck-peer test (its watchdog's 0.2 s)


@pytest.fixture
def rig():
    rig = Rig()
    timeout = gevent.Timeout(TEST_S, AssertionError(f"the test took more than {TEST_S} s"))
    timeout.start()
    try:
        yield rig
    finally:
        timeout.close()
        rig.close()


def test_a_lost_backend_sits_out_the_next_round_and_the_next_gets_replayed_then_buffered_then_live(rig):
    a = rig.backend(answer_pings=False)  # acknowledges nothing: all it got is to be replayed
    b = rig.backend()
    rig.leases.pool.policy = "least_connections"
    rig.leases.pool.acquire(rig.clock(), exclude={a.url})  # b is busier: the pool would pick a again
    pipe, client = rig.open_pipe()
    on_a = a.next_connection()
    client.send("m1", "m2")
    assert on_a.next_messages(2) == ["m1", "m2"]
    b.handshakes.clear()
    on_a.kill()
    b.upgrades.get(timeout=WAIT_S)  # the pipe waits for b's answer: it has no backend meanwhile
    client.send("m3", "m4")
    rig.quiesce()  # read and buffered
    b.handshakes.set()
    on_b = b.next_connection()
    pipe.telemetry.wait_for("failover", a.url, b.url)
    client.send("m5")
    assert on_b.next_messages(5) == ["m1", "m2", "m3", "m4", "m5"]
    assert reconnects(on_b) == 1
    report = pipe.session.last_failover
    assert (report.replayed, report.flushed_messages) == (2, 4)
    assert rig.leases.acquired == [(frozenset(), a.url), (frozenset({a.url}), b.url)]


def test_a_lost_backend_alone_in_the_pool_is_tried_again(rig):
    a = rig.backend(answer_pings=False)
    pipe, client = rig.open_pipe()
    first = a.next_connection()
    client.send("m1")
    assert first.next_messages(1) == ["m1"]
    first.kill()
    second = a.next_connection()
    client.send("m2")
    assert second.next_messages(2) == ["m1", "m2"]
    assert reconnects(second) == 1
    assert rig.leases.acquired == [(frozenset(), a.url), (frozenset(), a.url)]


def test_rounds_wait_out_the_backoff_on_the_clock_and_a_pool_change_retries_at_once(rig):
    rig.leases.pool.max_failures = 1  # ejected at its first failure, until long after this test
    rig.leases.pool.eject_base_s = rig.leases.pool.eject_max_s = 600
    dead = rig.backend()
    dead.stop()
    pipe, client = rig.open_pipe()
    client.send("early")
    rig.settle(pipe)
    # the first round (connect_first) and the one start() makes at once: then rounds wait
    assert rig.leases.acquired == [(frozenset(), dead.url), (frozenset({dead.url}), None), (frozenset(), None)]
    delays = []
    for _ in range(3):
        due = pipe.session.next_deadline()
        delays.append(due - rig.clock())
        asked = len(rig.leases.acquired)
        rig.tick_to(due - 0.001)
        rig.settle(pipe)
        assert len(rig.leases.acquired) == asked  # not yet
        rig.tick_to(due)
        rig.settle(pipe)
        assert rig.leases.acquired[asked:] == [(frozenset(), None)]  # one round, now
    # growing, jittered delays from --backoff-initial (0.05 s): [0.05, 0.1], [0.1, 0.2], [0.2, 0.4]
    assert all(0.05 * 2 ** i <= d <= 0.1 * 2 ** i for i, d in enumerate(delays)), delays
    good = rig.backend()  # added to the pool: the waiting pipe is woken and tries at once
    on_good = good.next_connection()
    assert on_good.next_messages(1) == ["early"]
    assert len(rig.leases.acquired) == 7


def test_a_failed_round_is_not_retried_before_its_backoff(rig):
    rig.leases.pool.max_failures = 20  # the pool ejects it after 20 failures in a row
    dead = rig.backend()
    dead.stop()
    pipe, client = rig.open_pipe()
    rig.settle(pipe)  # the clock has not moved: no backoff delay has passed
    # connect_first's round, and the one start() makes at once; each tries dead, then finds none
    assert rig.leases.acquired == [(frozenset(), dead.url), (frozenset({dead.url}), None)] * 2


def test_a_takeover_gets_what_the_first_connection_had_not_acknowledged(rig):
    a = rig.backend()
    pipe, first = rig.open_pipe(answer_pings=False)
    first.send("m1")
    assert first.next_messages(1) == ["m1"]
    first.pong(first.wait_ping(1))  # m1 acknowledged
    rig.quiesce()
    rig.clock.advance(0.01)  # later than the fence interval: m2 gets a fence of its own
    first.send("m2")
    assert first.next_messages(1) == ["m2"]
    first.wait_ping(2)  # not answered
    second = rig.connect_client(pipe)
    assert second.next_messages(1) == ["m2"]
    assert first.wait_ended() == CLOSE_TAKEN_OVER
    second.send("m3")
    assert second.next_messages(1) == ["m3"]
    assert [payload for _, payload in a.peers[0].received] == [b"m1", b"m2", b"m3"]
    assert len(a.peers) == 1  # the backend saw nothing of it
    telemetry = pipe.telemetry
    assert telemetry.wait_for("closed", CLOSE_TAKEN_OVER) == ("closed", CLOSE_TAKEN_OVER, "takeover")
    assert ("resume", "takeover") in telemetry.events


def test_a_backend_that_acknowledges_nothing_is_sent_half_the_cap_then_held_back_until_its_pong(rig):
    a = rig.backend(echo=False, answer_pings=False)
    pipe, client = rig.open_pipe(buffer_limit_bytes=64 * 1024)  # the client's reader waits at 32 KiB
    backend = a.next_connection()
    message = bytes(4096)
    for i in range(8):
        rig.clock.advance(0.01)  # each message gets its fence
        client.send(message)
        backend.next_messages(1)
    client.send(b"ninth", b"tenth")
    rig.quiesce()
    assert len(backend.received) == 8  # 32 KiB unacknowledged: the ninth waits
    assert pipe.session.buffer.total_bytes == 8 * 4096
    backend.pong(backend.wait_ping(8))  # acknowledges all eight
    assert backend.next_messages(2) == [b"ninth", b"tenth"]
    assert not pipe.session.closed


def test_when_both_peers_stop_reading_the_client_is_dropped_first(rig):
    # the write locks' watchdog runs on real time: a write that made no progress for
    # pong_timeout_s (0.2 s here) loses its connection, the client's first when both are stuck
    a = rig.backend()
    pipe, client = rig.open_pipe(pong_timeout_s=0.2, resume_grace_s=0, reading=False,
                                 max_message_size_bytes=64 << 20, buffer_limit_bytes=64 << 20)
    backend = a.next_connection()
    backend.freeze()
    big = bytes(16 << 20)  # far more than the socket buffers of a peer that reads nothing hold
    senders = [rig.group.spawn(backend.send, big), rig.group.spawn(client.send, big)]
    # the pipe's writes of each to the other have begun (and cannot end): each holds its lock
    gsocket.wait_read(backend.sock.fileno(), timeout=WAIT_S)
    gsocket.wait_read(client.sock.fileno(), timeout=WAIT_S)
    gevent.joinall(senders, timeout=WAIT_S)  # the pipe read both whole
    rig.quiesce()
    rig.tick(0)  # a supervisor turn: it takes both write locks for its poll
    telemetry = pipe.telemetry
    telemetry.wait_for("count", "backends_dropped_stuck")
    dropped = [e[1] for e in telemetry.events if e[0] == "count" and e[1].endswith("_dropped_stuck")]
    assert dropped == ["clients_dropped_stuck", "backends_dropped_stuck"]
    assert pipe.wait_closed(WAIT_S)  # resume off: the client's drop ended the session


def test_an_idle_pipe_gives_up_its_greenlets_and_data_brings_them_back(rig):
    a = rig.backend()
    pipe, client = rig.open_pipe(park_after_s=30, keepalive_s=300)
    client.send("warm")
    assert client.next_messages(1) == ["warm"]
    rig.quiesce()  # the fences' pongs too have been read
    rig.tick(30)
    rig.settle(pipe)  # the first look notes what each reader has read
    rig.tick(30)      # the second parks those that read nothing since, and the supervisor goes
    running = [pipe._supervisor] + [reader.greenlet for reader in pipe._readers()]
    assert None not in running
    gevent.joinall(running, timeout=WAIT_S)
    assert pipe._supervisor is None
    assert [reader.greenlet for reader in pipe._readers()] == [None, None]
    assert pipe.telemetry.counters["readers_parked"] == 2
    client.send("again")
    assert client.next_messages(1) == ["again"]
    assert all(reader.greenlet is not None for reader in pipe._readers())
    assert [payload for _, payload in a.peers[0].received] == [b"warm", b"again"]


def test_the_reconnect_deadline_falls_exactly_when_the_clock_reaches_it(rig):
    pipe, client = rig.open_pipe(reconnect_deadline_s=3)  # an empty pool: no backend ever
    deadline = pipe.opened_at + 3
    rig.tick_to(deadline - 0.001)
    rig.settle(pipe)
    assert not pipe.session.closed and not client.ended.is_set()
    rig.tick_to(deadline)
    assert client.wait_ended() == 1013
    assert client.close_reason == "no backend within 3 s"


def test_the_resume_grace_falls_exactly_when_the_clock_reaches_it(rig):
    a = rig.backend()
    pipe, client = rig.open_pipe(resume_grace_s=5)
    backend = a.next_connection()
    client.kill()
    pipe.telemetry.wait_for("resume", "detached")
    grace_ends = rig.clock() + 5
    rig.tick_to(grace_ends - 0.001)
    rig.settle(pipe)
    assert not pipe.session.closed and not backend.ended.is_set()
    rig.tick_to(grace_ends)
    assert backend.wait_ended() == 1000
    assert pipe.wait_closed(WAIT_S)
    assert ("resume", "expired") in pipe.telemetry.events


def test_a_keepalive_and_its_pong_timeout_fall_exactly_when_the_clock_reaches_them(rig):
    a = rig.backend(answer_pings=False)
    pipe, client = rig.open_pipe(keepalive_s=10, pong_timeout_s=4, resume_grace_s=0)
    backend = a.next_connection()
    keepalive = rig.clock() + 10
    rig.tick_to(keepalive - 0.001)
    rig.settle(pipe)
    assert backend.pings == []
    rig.tick_to(keepalive)
    backend.wait_ping(1)
    rig.tick_to(keepalive + 4 - 0.001)
    rig.settle(pipe)
    assert not backend.ended.is_set() and a.connections.empty()
    rig.tick_to(keepalive + 4)
    assert backend.wait_ended() is None  # dropped, not closed: it is not answering
    again = a.next_connection()
    assert reconnects(again) == 1
    assert pipe.telemetry.wait_for("failover")[3] == "no pong within 4 s"


def test_a_backends_pong_held_up_behind_a_write_to_a_slow_client_is_excused_on_the_pipes_clock(rig):
    # far past this machine's monotonic time: a stall noted on that clock would be older than
    # the wait for the Pong, and excuse nothing
    rig.clock.now = 1e7
    a = rig.backend(echo=False, answer_pings=False)
    pipe, client = rig.open_pipe(pong_timeout_s=4, max_message_size_bytes=64 << 20,
                                 buffer_limit_bytes=64 << 20)
    backend = a.next_connection()
    client.send("m1")
    assert backend.next_messages(1) == ["m1"]
    fence = backend.wait_ping(1)
    fenced_at = rig.clock()  # the backend's Pong is due 4 s from now
    client.freeze()
    rig.clock.advance(1)
    first, second = bytes(4 << 20), b"\x01" * (2 << 20)
    sender = rig.group.spawn(backend.send, first, second)
    gsocket.wait_read(client.sock.fileno(), timeout=WAIT_S)  # the pipe's write of the first has begun
    rig.quiesce()  # and waits for the client, which reads nothing; the second waits unread
    assert pipe.client.writing and pipe.backend.has_unread()
    rig.tick_to(fenced_at + 4)  # the Pong is late; the supervisor waits for the client's write lock
    client.thaw()  # the write ends now, on the pipe's clock after the Pong was asked for
    assert pipe.telemetry.wait_for("count", "backend_answers_excused")
    backend.pong(fence)  # behind the second message: read once the client has taken the first
    assert client.next_messages(2) == [first, second]
    sender.get(timeout=WAIT_S)
    rig.quiesce()  # the client's Pongs have been read too
    rig.tick_to(fenced_at + 8)  # when the excuse would have run out
    rig.settle(pipe)
    assert not backend.ended.is_set() and a.connections.empty()
    assert not [e for e in pipe.telemetry.events if e[0] == "failover"]
    assert not pipe.session.closed
