"""Idle pipes hold no greenlet: readers are parked and the supervisor hands over to a timer;
traffic, failures and deadlines bring them back."""

from __future__ import annotations

import signal
import socket

import pytest
import websocket

from conftest import recv_close, stats, wait_for


def greenlets(proxy) -> int:
    return proxy.admin("GET", path="/admin/status")[1]["greenlets"]


def echo(ws, payload: bytes) -> bytes:
    ws.send_binary(payload)
    return ws.recv()


def park_all(proxy, base: int) -> None:
    """Wait until the pipes hold no greenlet: readers parked, supervisors handed over to timers."""
    wait_for(lambda: greenlets(proxy) <= base, what="idle pipes to give up their greenlets")


def test_idle_pipes_give_up_their_greenlets_and_traffic_brings_them_back(processes):
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url, "--park-after", "0.1")
    base = greenlets(proxy)
    clients = [proxy.connect() for _ in range(5)]
    for i, ws in enumerate(clients):
        assert echo(ws, b"first %d" % i) == b"first %d" % i
    busy = greenlets(proxy)
    assert busy >= base + 5 * 2  # at least a client reader and a backend reader per pipe
    park_all(proxy, base)
    for round_ in range(3):  # each round wakes both readers of every pipe, then they park again
        for i, ws in enumerate(clients):
            payload = b"round %d pipe %d " % (round_, i) + bytes(range(256)) * 40
            assert echo(ws, payload) == payload
        park_all(proxy, base)
    assert stats(a)["messages_total"] == 5 * 4


@pytest.mark.parametrize("client_answers", [True, False], ids=["client-answers-its-fence", "client-silent"])
def test_an_idle_pipe_sends_its_keepalives_on_time(processes, client_answers):
    """Keepalives every 0.2 s, pong timeout 10 s: each keepalive's Pong must set the sleeping
    supervisor's timer to the next keepalive, whether the timer was set for that keepalive's
    pong timeout or (a client that has not answered the fence sent with its echo) the client's."""
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url, "--park-after", "0.1", "--keepalive", "0.2", "--pong-timeout", "10")
    ws = proxy.connect()
    assert echo(ws, b"hello") == b"hello"
    if client_answers:
        opcode, _ = ws.recv_data_frame(True)  # websocket-client answers the fence with a Pong
        assert opcode == websocket.ABNF.OPCODE_PING
    start = stats(a)["pings_total"]
    wait_for(lambda: stats(a)["pings_total"] >= start + 8, timeout=5, what="eight keepalives (one per 0.2 s)")
    assert echo(ws, b"still here") == b"still here"
    assert stats(a)["messages_total"] == 2


def test_park_after_0_keeps_every_greenlet_for_the_pipes_life(processes):
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url, "--park-after", "0", "--keepalive", "0.2")
    base = greenlets(proxy)
    clients = [proxy.connect() for _ in range(2)]  # and quiet: only keepalives wake their supervisors
    # a supervisor, a client reader and a backend reader each (a supervisor that left after its
    # first turn would leave 4, or 5 while the second pipe's runs)
    wait_for(lambda: greenlets(proxy) == base + 6, what="three greenlets per pipe")
    # still so after more than the default --park-after (1 s) of keepalives: 6 per pipe take 1.2 s
    wait_for(lambda: stats(a)["pings_total"] >= 12, what="six keepalives per pipe")
    assert greenlets(proxy) == base + 6
    for i, ws in enumerate(clients):
        assert echo(ws, b"x %d" % i) == b"x %d" % i


def test_backend_killed_while_parked_fails_over_without_loss(processes):
    a = processes.echo(name="a")
    b = processes.echo(name="b")
    proxy = processes.proxy("--backend", a.url, "--backend", b.url, "--park-after", "0.1")
    base = greenlets(proxy)
    ws = proxy.connect()
    assert echo(ws, b"before") == b"before"
    park_all(proxy, base)
    serving, other = (a, b) if proxy.pipes()[0]["backend"] == a.url else (b, a)
    serving.kill()  # the parked backend reader is woken by the EOF
    wait_for(lambda: proxy.pipes()[0]["backend"] == other.url, what="failover to the other backend")
    assert echo(ws, b"after") == b"after"
    assert proxy.pipes()[0]["failovers"] == 1


def test_client_dropped_while_parked_detaches_and_resumes(processes):
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url, "--park-after", "0.1", "--resume-grace", "10")
    base = greenlets(proxy)
    client_id = "6f1c1c1e-8d4b-4b6e-9a55-3f1d2b0c9a01"
    ws = proxy.connect(client_id)
    assert echo(ws, b"hello") == b"hello"
    park_all(proxy, base)
    ws.sock.shutdown(socket.SHUT_RDWR)  # no Close frame: the parked client reader sees EOF
    ws.sock.close()
    wait_for(lambda: proxy.pipes()[0]["state"] == "detached", what="the session to detach")
    again = proxy.connect(client_id)
    assert again.recv() == b"hello"  # never acknowledged (this client answered no fence): delivered again
    assert echo(again, b"back") == b"back"
    again.close()
    wait_for(lambda: proxy.pipes() == [], what="the pipe to end")


def test_sigterm_closes_idle_pipes_with_1012(processes):
    """Pipes with no greenlet still get the close handshake of a graceful stop."""
    a = processes.echo(name="a")
    proxy = processes.proxy("--backend", a.url, "--park-after", "0.1")
    base = greenlets(proxy)
    clients = [proxy.connect() for _ in range(5)]
    for ws in clients:
        assert echo(ws, b"x") == b"x"
    park_all(proxy, base)
    proxy.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        assert recv_close(ws) == (1012, "proxy restarting")
    assert proxy.proc.wait(10) == 0
    assert stats(a)["connections_open"] == 0
