"""A pipe's own rules, checked in-process on socket pairs (no proxy process, no manager)."""

from __future__ import annotations

from gevent import socket as gsocket

from inprocess import make_pipe

from iwsproxy.frames import OP_CLOSE, FrameParser
from iwsproxy.io.connection import Connection
from iwsproxy.io.events import PerformAsked
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
