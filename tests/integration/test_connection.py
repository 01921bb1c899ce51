"""Connection over a real loopback TCP pair (gevent sockets, in this process): a reader brought
back from parking by control frames alone parks again by itself; one that gets data stays."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket as gsocket

from iwsproxy.frames import OP_BINARY, OP_PING, OP_PONG, encode_frame
from iwsproxy.io.connection import Connection, Parked

TIMEOUT_S = 5  # a read that should return at once and blocks instead fails the test after this


@pytest.fixture
def pair():
    """(our Connection in the client role, the peer's raw socket), connected over 127.0.0.1."""
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = gsocket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    conn = Connection(ours, server_side=False, max_message_size=1 << 20)
    yield conn, peer
    conn.abort()
    peer.close()


def read(conn: Connection) -> list:
    with gevent.Timeout(TIMEOUT_S):
        return conn.read()


def test_a_resumed_reader_that_reads_only_control_frames_parks_again_at_once(pair):
    conn, peer = pair
    got_data = []
    conn.resume(lambda: got_data.append(True))
    peer.sendall(encode_frame(OP_PONG, b"fence 1") + encode_frame(OP_PING, b"hello"))
    assert read(conn) == []
    assert conn.controls == [(OP_PONG, b"fence 1"), (OP_PING, b"hello")]
    with pytest.raises(Parked):  # without waiting: nothing else was sent
        read(conn)
    assert got_data == []
    peer.sendall(encode_frame(OP_BINARY, b"later"))  # nothing was lost by parking
    assert read(conn) == [(OP_BINARY, b"later")]


def test_a_resumed_reader_that_gets_data_reports_it_once_and_stays(pair):
    conn, peer = pair
    got_data = []
    conn.resume(lambda: got_data.append(True))
    peer.sendall(encode_frame(OP_BINARY, b"data"))
    assert read(conn) == [(OP_BINARY, b"data")]
    assert got_data == [True]
    peer.sendall(encode_frame(OP_PONG, b"fence 2"))
    assert read(conn) == []  # a pong now is just a pong: the reader is busy, the supervisor parks it
    assert conn.controls == [(OP_PONG, b"fence 2")]
    peer.sendall(encode_frame(OP_BINARY, b"more"))
    assert read(conn) == [(OP_BINARY, b"more")]
    assert got_data == [True]


def test_a_reader_never_parked_keeps_reading_after_control_frames(pair):
    conn, peer = pair
    peer.sendall(encode_frame(OP_PONG, b"fence 3"))
    assert read(conn) == []
    peer.sendall(encode_frame(OP_BINARY, b"next"))
    assert read(conn) == [(OP_BINARY, b"next")]
