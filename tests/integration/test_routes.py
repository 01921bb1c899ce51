"""Routes: each path prefix has a pool of its own (real proxy and echo backends in processes)."""

from __future__ import annotations

import re
import urllib.request
import uuid

import pytest
import websocket

from conftest import ADMIN_TOKEN, recv_close, stats, wait_for
from iwsproxy import cli


def connect(proxy, path: str) -> websocket.WebSocket:
    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(proxy.url_for(f"{path}/{client_id}"), timeout=10)
    ws.client_id = client_id
    return ws


def echoes(ws: websocket.WebSocket, text: str) -> bool:
    ws.send(text)
    return ws.recv() == text


def refused_with(proxy, path: str) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        connect(proxy, path)
    return caught.value.status_code


def pipe_of(proxy, ws) -> dict:
    return next(p for p in proxy.pipes() if ws.client_id.startswith(p["client"]))  # a short id


@pytest.mark.timeout(60)
def test_each_route_sends_its_clients_to_its_own_pool(processes):
    chat, news = processes.echo(name="chat"), processes.echo(name="news")
    proxy = processes.proxy("--route", f"/chat={chat.url}", "--route", f"/news={news.url}")
    chat_client, news_client = connect(proxy, "/chat"), connect(proxy, "/news/today")
    assert echoes(chat_client, "to chat") and echoes(news_client, "to news")
    assert (stats(chat)["connections_total"], stats(news)["connections_total"]) == (1, 1)
    assert stats(chat)["last_headers"]["x-iwsproxy-client-id"] == chat_client.client_id
    assert stats(news)["last_headers"]["x-iwsproxy-client-id"] == news_client.client_id
    assert stats(news)["last_path"] == "/news/today"  # the path passes through (no path in the URL)
    assert pipe_of(proxy, chat_client)["pool"] == "/chat" and pipe_of(proxy, news_client)["pool"] == "/news"
    status, body = proxy.admin("GET")
    assert status == 200 and body["pools"] == ["/chat", "/news"]  # no catch-all: no default pool
    assert {(b["pool"], b["url"], b["pipes"]) for b in body["backends"]} == {("/chat", chat.url, 1),
                                                                            ("/news", news.url, 1)}
    chat_client.close()
    news_client.close()


@pytest.mark.timeout(60)
def test_a_prefix_matches_whole_segments_and_the_longest_wins(processes):
    chat, room, rest = processes.echo(name="chat"), processes.echo(name="room"), processes.echo(name="rest")
    proxy = processes.proxy("--route", f"/chat={chat.url}", "--route", f"/chat/room={room.url}",
                            "--route", f"/={rest.url}")
    clients = [connect(proxy, path) for path in ("/chatroom", "/chat/room", "/chat", "/chat/roomy")]
    assert all(echoes(ws, "hi") for ws in clients)
    assert [pipe_of(proxy, ws)["pool"] for ws in clients] == ["default", "/chat/room", "/chat", "/chat"]
    assert [stats(b)["connections_total"] for b in (chat, room, rest)] == [2, 1, 1]
    assert stats(rest)["last_path"] == "/chatroom"
    for ws in clients:
        ws.close()


@pytest.mark.timeout(60)
def test_a_path_under_no_route_gets_404_before_the_upgrade(processes):
    chat = processes.echo(name="chat")
    proxy = processes.proxy("--route", f"/chat={chat.url}")
    assert refused_with(proxy, "/chatroom") == 404  # /chat is not a prefix of /chatroom
    assert refused_with(proxy, "") == 404
    assert refused_with(proxy, "/other/chat") == 404
    assert stats(chat)["connections_total"] == 0
    assert proxy.pipes() == []
    ws = connect(proxy, "/chat")
    assert echoes(ws, "still routed")
    ws.close()


@pytest.mark.timeout(60)
def test_admin_add_and_remove_on_a_named_pool(processes, capsys):
    chat, extra = processes.echo(name="chat"), processes.echo(name="extra")
    proxy = processes.proxy("--route", f"/chat={chat.url}", "--route", f"/news={chat.url}")
    assert proxy.admin("POST", {"url": extra.url, "pool": "/chat"}) == (
        201, {"url": extra.url, "pool": "/chat", "added": True})
    assert proxy.admin("POST", {"url": extra.url, "pool": "/chat"})[0] == 200
    assert proxy.admin("POST", {"url": extra.url, "pool": "/nope"})[0] == 404
    assert proxy.admin("POST", {"url": extra.url, "pool": 7})[0] == 400
    pools = {(b["pool"], b["url"]) for b in proxy.admin("GET")[1]["backends"]}
    assert pools == {("/chat", chat.url), ("/chat", extra.url), ("/news", chat.url)}
    # the CLI names the pool too
    admin = ["--admin", proxy.http_url + "/admin", "--token", ADMIN_TOKEN]
    assert cli.main(["backends", "list", "--pool", "/chat", *admin]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted([chat.url, extra.url])
    assert all("\tpool=/chat\t" in line for line in listed)
    # remove from one pool: the same URL in another pool stays
    assert proxy.admin("DELETE", {"url": chat.url})[0] == 404  # not in the default pool
    assert cli.main(["backends", "remove", chat.url, "--pool", "/chat", *admin]) == 0
    capsys.readouterr()
    pools = {(b["pool"], b["url"]) for b in proxy.admin("GET")[1]["backends"]}
    assert pools == {("/chat", extra.url), ("/news", chat.url)}
    ws = connect(proxy, "/chat")
    assert echoes(ws, "on the added backend")
    assert pipe_of(proxy, ws)["backend"] == extra.url
    assert stats(extra)["connections_total"] == 1
    assert proxy.admin("DELETE", {"url": extra.url, "pool": "/chat", "drain": True, "window_s": 0})[0] == 202
    ws.close()


@pytest.mark.timeout(60)
def test_a_killed_backend_fails_over_within_its_routes_pool_only(processes):
    a1, a2, other = processes.echo(name="a1"), processes.echo(name="a2"), processes.echo(name="other")
    proxy = processes.proxy("--route", f"/chat={a1.url},{a2.url}", "--route", f"/news={other.url}")
    news = connect(proxy, "/news")
    chat = connect(proxy, "/chat")
    assert echoes(news, "n0") and echoes(chat, "c0")
    first = pipe_of(proxy, chat)["backend"]
    victim, survivor = (a1, a2) if first == a1.url else (a2, a1)
    victim.kill()
    received = []
    for i in range(20):
        chat.send(f"c{i}")
        received.append(chat.recv())
    assert received == [f"c{i}" for i in range(20)]
    moved = wait_for(lambda: pipe_of(proxy, chat) if pipe_of(proxy, chat)["failovers"] == 1 else None,
                     what="the chat pipe to fail over")
    assert moved["backend"] == survivor.url and moved["pool"] == "/chat"
    assert stats(survivor)["connections_total"] == 1
    assert stats(other)["connections_total"] == 1  # the news client's only: nothing failed over to it
    assert echoes(news, "n1") and pipe_of(proxy, news)["failovers"] == 0
    chat.close()
    news.close()


@pytest.mark.timeout(60)
def test_one_client_id_on_two_routes_is_two_sessions(processes):
    chat, news = processes.echo(name="chat"), processes.echo(name="news")
    proxy = processes.proxy("--route", f"/chat={chat.url}", "--route", f"/news={news.url}")
    client_id = str(uuid.uuid4())
    on_chat = websocket.create_connection(proxy.url_for(f"/chat/{client_id}"), timeout=10)
    on_news = websocket.create_connection(proxy.url_for(f"/news/{client_id}"), timeout=10)
    assert echoes(on_chat, "c") and echoes(on_news, "n")
    assert sorted(p["pool"] for p in proxy.pipes()) == ["/chat", "/news"]
    # a second connection on /chat takes over the /chat session only
    again = websocket.create_connection(proxy.url_for(f"/chat/{client_id}"), timeout=10)
    assert recv_close(on_chat)[0] == 4409
    again.send("c2")
    got = [again.recv()]
    if got == ["c"]:  # what the old connection had not acknowledged may come again
        got.append(again.recv())
    assert got[-1] == "c2" and echoes(on_news, "n2")
    assert (stats(chat)["connections_total"], stats(news)["connections_total"]) == (1, 1)
    again.close()
    on_news.close()


def status_page_pools(proxy) -> list[str]:
    """The Pool column of the status page's backend table, row by row."""
    req = urllib.request.Request(proxy.http_url + "/admin/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        html = resp.read().decode()
    return re.findall(r'data-field="pool">([^<]*)<', html.split("<h2", 2)[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("catch_all", ["--backend", "--route /"])
def test_the_catch_all_is_the_default_pool_everywhere(processes, capsys, catch_all):
    chat, rest, extra = processes.echo(name="chat"), processes.echo(name="rest"), processes.echo(name="extra")
    given = ["--backend", rest.url] if catch_all == "--backend" else ["--route", f"/={rest.url}"]
    proxy = processes.proxy("--route", f"/chat={chat.url}", *given)
    chat_client, other = connect(proxy, "/chat"), connect(proxy, "/chatroom/7")
    assert echoes(chat_client, "c") and echoes(other, "o")
    assert pipe_of(proxy, chat_client)["pool"] == "/chat" and pipe_of(proxy, other)["pool"] == "default"
    assert stats(rest)["last_path"] == "/chatroom/7"
    # the admin API, the CLI and the status page call it "default", and it is the one changed without --pool
    status, body = proxy.admin("GET")
    assert body["pools"] == ["default", "/chat"]
    assert proxy.admin("POST", {"url": extra.url}) == (201, {"url": extra.url, "pool": "default", "added": True})
    admin = ["--admin", proxy.http_url + "/admin", "--token", ADMIN_TOKEN]
    assert cli.main(["backends", "list", "--pool", "default", *admin]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted([rest.url, extra.url])
    assert sorted(status_page_pools(proxy)) == ["/chat", "default", "default"]
    other.close()
    chat_client.close()


@pytest.mark.timeout(60)
def test_without_a_catch_all_there_is_no_default_pool_to_name(processes, capsys):
    chat, extra = processes.echo(name="chat"), processes.echo(name="extra")
    proxy = processes.proxy("--route", f"/chat={chat.url}")
    status, body = proxy.admin("POST", {"url": extra.url})  # no pool given: the default one, which is not there
    assert status == 404 and body["pools"] == ["/chat"] and "catch-all" in body["error"]
    admin = ["--admin", proxy.http_url + "/admin", "--token", ADMIN_TOKEN]
    with pytest.raises(SystemExit) as caught:
        cli.main(["backends", "add", extra.url, *admin])
    assert "404" in str(caught.value) and "catch-all" in str(caught.value)
    with pytest.raises(SystemExit) as caught:
        cli.main(["backends", "list", "--pool", "default", *admin])
    assert "no pool 'default'" in str(caught.value) and "/chat" in str(caught.value)
    assert status_page_pools(proxy) == ["/chat"]
    assert refused_with(proxy, "/elsewhere") == 404
    assert stats(extra)["connections_total"] == 0


def raw_status(proxy, target: str, *headers: str) -> tuple[int, str]:
    """The status line's code and the head of the answer to a raw upgrade request for ``target``
    (as sent: no client library normalises it)."""
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
                 *headers]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    return int(head.split()[1]), head


@pytest.mark.timeout(60)
def test_dot_segments_are_refused_and_refusals_assign_no_id(processes):
    chat = processes.echo(name="chat")
    proxy = processes.proxy("--route", f"/chat={chat.url}", "--client-id-from", "cookie:sid", "--assign-client-id")
    # each would be under /chat here and under another path once normalised (as nginx does before routing)
    for target in ("/chat/../admin", "/chat/%2e%2e/admin", "/chat%2F..%2Fadmin", "/chat/./x", "/chat/.."):
        status, head = raw_status(proxy, target)
        assert status == 400 and "set-cookie" not in head.lower(), (target, head)
    status, head = raw_status(proxy, "/chatroom")  # under no route: 404, before any id is made up
    assert status == 404 and "set-cookie" not in head.lower() and "x-iwsproxy-client-id" not in head.lower()
    status, head = raw_status(proxy, "/chat/x", "Cookie: other=" + "b" * 20000)  # a header too large
    assert status == 431 and "set-cookie" not in head.lower()
    assert stats(chat)["connections_total"] == 0 and proxy.pipes() == []
    status, head = raw_status(proxy, "/chat/...")  # a segment of three dots is a name like any other
    assert status == 101 and "set-cookie: sid=" in head.lower()
