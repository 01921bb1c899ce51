"""Resume across processes of one host: a client that comes back through another proxy process
(another gunicorn worker, say) is handed, socket and all, to the process holding its session."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import websocket

from conftest import stats, wait_for
from test_gunicorn import Gunicorn
from iwsproxy.tokens import sign
from test_resume import drop, first_deliveries, numbers


def status_counters(proxy) -> dict:
    return proxy.admin("GET", path="/admin/status")[1]["counters"]


@pytest.fixture
def handoff(tmp_path):
    """A handoff directory as the README asks for it: existing and private."""
    directory = tmp_path / "handoff"
    directory.mkdir(mode=0o700)
    return directory


def drop_and_wait_detached(ws, holder) -> None:
    drop(ws)
    wait_for(lambda: holder.pipes()[0]["state"] == "detached", what="the pipe to detach")


def test_a_client_resuming_through_another_process_gets_its_session_back(processes, handoff):
    backend = processes.echo("--stream-interval-ms", "5")
    holder = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    other = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    ws = holder.connect()
    before = numbers(ws, 50)
    drop_and_wait_detached(ws, holder)

    again = other.connect(ws.client_id)  # the other process hands the connection over
    after = numbers(again, before[-1] + 100)
    order = first_deliveries(before + after)
    assert order == list(range(1, order[-1] + 1)), "every number once at least, in order"
    assert stats(backend)["connections_total"] == 1      # the backend never noticed
    assert holder.pipes()[0]["resumes"] == 1 and other.pipes() == []
    assert status_counters(other)["handed_over"] == 1 and status_counters(holder)["handed_in"] == 1
    sockets = sorted(os.listdir(handoff))
    assert len(sockets) == 2  # one per process that has served a pipe
    assert all(stat.S_IMODE(os.stat(handoff / name).st_mode) & 0o077 == 0 for name in sockets)

    fresh = other.connect()  # an id nobody holds stays where it landed
    assert [p["client"] for p in other.pipes()] == [fresh.client_id[:8]]
    assert len(holder.pipes()) == 1
    again.close()
    fresh.close()


def test_the_holder_answers_a_handed_over_request_with_its_own_refusals(processes, handoff):
    backend = processes.echo()
    secret = ("--resume-secret", "s3cret")
    holder = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff), *secret)
    other = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff), *secret)
    ws = holder.connect()
    drop_and_wait_detached(ws, holder)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        other.connect(ws.client_id)  # no token: the holder refuses the resume, over the handed socket
    assert refused.value.status_code == 403
    assert b"needs a valid token" in refused.value.resp_body
    again = other.connect(ws.client_id, header=[f"X-Iwsproxy-Token: {sign('s3cret', ws.client_id)}"])
    again.send("back")
    assert again.recv() == "back"
    assert holder.pipes()[0]["resumes"] == 1 and other.pipes() == []
    again.close()


def test_gunicorn_workers_hand_a_returning_client_to_the_worker_holding_its_session(processes, handoff):
    backend = processes.echo("--stream-interval-ms", "5")
    server = Gunicorn(backend.url, workers=2)
    server.env["IWSPROXY_HANDOFF_DIR"] = str(handoff)
    processes.add(server)
    ws = server.connect()
    received = numbers(ws, 20)
    for _ in range(8):  # each reconnect lands on either worker; every one finds the session
        drop(ws)
        ws = server.connect(ws.client_id)
        received += numbers(ws, received[-1] + 20)
    order = first_deliveries(received)
    assert order == list(range(1, order[-1] + 1)), "every number once at least, in order"
    assert stats(backend)["connections_total"] == 1
    ws.close()


def test_garbage_on_the_handoff_socket_is_logged_and_changes_nothing(processes, handoff):
    backend = processes.echo()
    proxy = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    ws = proxy.connect()
    (path,) = [handoff / name for name in os.listdir(handoff)]
    for junk in (b"", b"\x00\x00\x00\x05{}{}{", b"\xff" * 64, b"\x00\x00\x00\x0f{\"op\": \"take\"}",
                 b"\x00\x00\x00\x10{\"op\": \"shrug\"}"):
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.settimeout(5)
        peer.connect(str(path))
        peer.sendall(junk)
        peer.shutdown(socket.SHUT_WR)
        assert peer.recv(16) == b""  # no answer, the connection just ends
        peer.close()
    ws.send("still here")
    assert ws.recv() == "still here"
    assert "handoff: bad message from a peer" in proxy.stderr_text()
    ws.close()


def test_a_socket_left_by_a_killed_process_is_removed_by_the_first_process_asking(processes, handoff):
    backend = processes.echo()
    holder = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    killed = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    killed.connect()  # a process names its socket when it first serves a pipe
    ws = holder.connect()
    assert len(os.listdir(handoff)) == 2
    killed.kill()
    drop_and_wait_detached(ws, holder)

    other = processes.proxy("--backend", backend.url, "--handoff-dir", str(handoff))
    again = other.connect(ws.client_id)  # asks both: the holder answers, the dead one is refused
    again.send("back")
    assert again.recv() == "back"
    assert holder.pipes()[0]["resumes"] == 1
    assert f"{killed.proc.pid}.sock" not in os.listdir(handoff)
    assert len(os.listdir(handoff)) == 2  # the holder's and the asker's
    again.close()


def test_a_handoff_dir_that_does_not_exist_stops_the_proxy_at_start(tmp_path):
    from iwsproxy.exceptions import ConfigError
    from iwsproxy.io.manager import PipeManager
    from iwsproxy.settings import Settings

    with pytest.raises(ConfigError, match="IWSPROXY_HANDOFF_DIR"):
        PipeManager(Settings(handoff_dir=str(tmp_path / "missing")))
