"""MessageBuffer's cap: it bounds the backlog, and any message the parser allows reaches a live peer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iwsproxy.buffer import Budget, MessageBuffer
from iwsproxy.exceptions import BufferOverflow
from iwsproxy.session import CloseClient, SendToBackend, SendToClient, Session, encode_fence

MiB = 1024 * 1024


def msg(nbytes: int, opcode: int = 2) -> list[tuple[int, bytes]]:
    return [(opcode, bytes(nbytes))]


@pytest.mark.parametrize("add", ["add_window", "add_pending"])
def test_a_buffer_under_half_full_takes_a_message_larger_than_its_cap(add):
    buf = MessageBuffer(10)
    getattr(buf, add)(msg(4))             # 4 < 5: under half full
    getattr(buf, add)(msg(100))           # far past the cap, taken
    assert buf.total_bytes == 104
    with pytest.raises(BufferOverflow) as info:
        getattr(buf, add)(msg(1))         # a backlog past the cap takes nothing more
    assert (info.value.size, info.value.limit, info.value.scope) == (105, 10, "client")
    assert (buf.total_bytes, len(buf)) == (104, 2)  # all or nothing


def test_a_buffer_half_full_or_more_takes_only_what_fits():
    buf = MessageBuffer(10)
    buf.add_pending(msg(5))
    buf.add_pending(msg(5))               # exactly the cap: fits
    with pytest.raises(BufferOverflow):
        buf.add_pending(msg(1))
    buf = MessageBuffer(10)
    buf.add_window(msg(5))
    with pytest.raises(BufferOverflow):
        buf.add_window(msg(6))            # 5 is half: only what fits
    buf.add_window(msg(3) + msg(2))
    assert buf.total_bytes == 10


def test_pending_messages_are_taken_one_by_one_a_write_to_a_live_peer_whole():
    pending = MessageBuffer(10)
    with pytest.raises(BufferOverflow):
        pending.add_pending(msg(6) + msg(6))  # the second comes to a buffer half full and does not fit
    assert pending.total_bytes == 0
    pending.add_pending(msg(4) + msg(100))    # the second comes while it is under half full
    assert pending.total_bytes == 104
    window = MessageBuffer(10)
    window.add_window(msg(100) + msg(6))      # one write (one read's messages) to a buffer under half full
    assert window.total_bytes == 106


def test_a_zero_cap_takes_nothing():
    buf = MessageBuffer(0)
    buf.add_pending([])
    with pytest.raises(BufferOverflow):
        buf.add_pending(msg(1))


def test_the_process_budget_stays_a_hard_cap():
    budget = Budget(100)
    a, b = MessageBuffer(10, budget), MessageBuffer(10, budget)
    a.add_window(msg(80))                 # past a's cap (a was empty), within the budget
    with pytest.raises(BufferOverflow) as info:
        b.add_window(msg(30))             # b is empty, but the process is not
    assert (info.value.scope, info.value.limit) == ("global", 100)
    assert (budget.used_bytes, b.total_bytes) == (80, 0)
    assert a.ack(1) == 80 and budget.used_bytes == 0
    b.add_window(msg(30))
    b.clear()
    assert budget.used_bytes == 0


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(0, 64),
       steps=st.lists(st.tuples(st.sampled_from(["window", "pending", "ack", "rewind", "flush"]),
                                st.lists(st.integers(0, 100), max_size=3)), max_size=30))
def test_one_buffer_holds_at_most_the_cap_or_half_of_it_plus_one_addition(limit, steps):
    buf = MessageBuffer(limit, Budget(10_000))
    for op, sizes in steps:
        held = buf.total_bytes
        batch = [(2, bytes(n)) for n in sizes]
        try:
            if op == "window":
                buf.add_window(batch)
            elif op == "pending":
                buf.add_pending(batch)
            elif op == "ack":
                buf.ack(len(sizes))
            elif op == "rewind":
                buf.rewind()
            else:
                buf.take_pending(keep=True)
        except BufferOverflow:
            assert op in ("window", "pending") and buf.total_bytes == held and held + sum(sizes) > limit
            if op == "window":
                assert held >= limit // 2
            else:  # some message came to a buffer at least half full, and did not fit
                assert any(held + sum(sizes[:i]) >= limit // 2 and held + sum(sizes[:i + 1]) > limit
                           for i in range(len(sizes)))
        else:
            if op == "pending" and held + sum(sizes) > limit:  # each message fitted, or came under half full
                assert all(held + sum(sizes[:i]) < limit // 2 or held + sum(sizes[:i + 1]) <= limit
                           for i in range(len(sizes)))
            if op == "window" and held + sum(sizes) > limit:   # the write came to a buffer under half full
                assert held < limit // 2
        assert buf.total_bytes <= max(limit, limit // 2 + sum(sizes)) or buf.total_bytes <= held
        assert buf.budget.used_bytes == buf.total_bytes


@pytest.mark.parametrize("limit, size", [(2, 1), (3, 1), (10, 3), (2, 16 * MiB), (10, 16 * MiB),
                                         (5 * MiB, MiB + 1), (5 * MiB, 16 * MiB)])
def test_whatever_flow_control_lets_through_to_a_live_peer_is_taken(limit, size):
    """A sender is held back while ``*_window_full()``; whatever it sends otherwise, of any size, is taken."""
    s = Session(buffer_limit_bytes=limit, now=0.0, resume_grace_s=5.0, budget=Budget(64 * MiB))
    s.backend_connected(0.0)
    now = 0.0
    for _ in range(3):
        while not s.backend_window_full():
            now += 1.0
            (action,) = s.client_messages(msg(size), now)
            assert type(action) is SendToBackend
        s.backend_pong(1, encode_fence(s.to_backend.fences[-1][0]), now)
        assert s.buffer.total_bytes == 0
    for _ in range(3):
        while not s.client_window_full():
            now += 1.0
            (action,) = s.backend_messages(msg(size, opcode=1), now)
            assert type(action) is SendToClient
        s.client_pong(encode_fence(s.to_client.fences[-1][0]), now)
        assert s.to_client.buffer.total_bytes == 0


def test_a_backlog_past_the_cap_while_no_backend_is_there_ends_the_session_with_1013():
    s = Session(buffer_limit_bytes=10, now=0.0)
    s.backend_connected(0.0)
    s.backend_lost(1, 1.0)
    assert s.client_messages(msg(16 * MiB), 1.1) == []    # an empty backlog takes it: the backend may come back
    assert s.client_messages(msg(1), 1.2) == [CloseClient(1013, "buffer limit of 10 bytes exceeded")]
