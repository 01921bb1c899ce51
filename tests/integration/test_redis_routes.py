"""Routes with the shared Redis registry: each route's pool is shared across processes as the default pool is.

A real redis-server runs for the module (tests/redis_server.py); each test uses its own
database number. The key layout is the one iwsproxy/io/redis_pools.py documents.
"""

from __future__ import annotations

import uuid

import pytest
import websocket

from conftest import needs, stats, wait_for
from redis_server import RedisServer, redis_server_missing


@pytest.fixture(scope="module")
def redis_server():
    needs(redis_server_missing(), "the Redis tests")
    server = RedisServer().start()
    yield server
    server.stop()


def in_pools(proxy) -> dict[str, list[str]]:
    """``{pool: [url, ...]}`` as the proxy's admin API lists them."""
    pools: dict[str, list[str]] = {}
    for entry in proxy.admin("GET")[1]["backends"]:
        pools.setdefault(entry["pool"], []).append(entry["url"])
    return pools


def connect(proxy, path: str) -> websocket.WebSocket:
    return websocket.create_connection(proxy.url_for(f"{path}/{uuid.uuid4()}"), timeout=10)


@pytest.mark.timeout(90)
def test_two_processes_share_each_routes_pool(processes, redis_server):
    redis_url = redis_server.url(11)
    a, b, rest = processes.echo(name="a"), processes.echo(name="b"), processes.echo(name="rest")
    given = ("--redis-url", redis_url, "--route", f"/chat={a.url}", "--backend", rest.url)
    one, two = processes.proxy(*given), processes.proxy(*given)
    assert in_pools(one) == in_pools(two) == {"default": [rest.url], "/chat": [a.url]}
    redis = redis_server.client(11)
    assert redis.zrange("iwsproxy:pool:/chat:backends", 0, -1) == [a.url]
    assert redis.zrange("iwsproxy:backends", 0, -1) == [rest.url]  # the default pool's keys as without routes

    # an add to the route's pool in one process reaches the other, in that pool only
    assert one.admin("POST", {"url": b.url, "pool": "/chat"})[0] == 201
    wait_for(lambda: in_pools(two).get("/chat") == [a.url, b.url], timeout=5, what="b in /chat of the second")
    assert in_pools(two)["default"] == [rest.url]
    assert redis.zrange("iwsproxy:pool:/chat:backends", 0, -1) == [a.url, b.url]

    # a drain of the route's backend moves the pipes of both processes, nothing lost
    ws_one, ws_two = connect(one, "/chat"), connect(two, "/chat")  # round robin: each first pipe on a
    for i in range(3):
        for ws in (ws_one, ws_two):
            ws.send(f"m{i}")
            assert ws.recv() == f"m{i}"
    assert [p["backend"] for p in one.pipes() + two.pipes()] == [a.url, a.url]
    status, body = one.admin("DELETE", {"url": a.url, "pool": "/chat", "drain": True, "window_s": 0})
    assert (status, body["pipes"]) == (202, 1)
    for i in range(3, 10):
        for ws in (ws_one, ws_two):
            ws.send(f"m{i}")
    for ws in (ws_one, ws_two):
        assert [ws.recv() for _ in range(3, 10)] == [f"m{i}" for i in range(3, 10)]
    wait_for(lambda: [p["backend"] for p in one.pipes() + two.pipes()] == [b.url, b.url],
             what="both pipes moved to b")
    wait_for(lambda: in_pools(one)["/chat"] == in_pools(two)["/chat"] == [b.url], what="a gone from both")
    assert [p["pool"] for p in one.pipes() + two.pipes()] == ["/chat", "/chat"]
    assert stats(rest)["connections_total"] == 0
    ws_one.close()
    ws_two.close()


@pytest.mark.timeout(90)
def test_single_pool_data_is_the_default_pool_and_route_urls_only_seed(processes, redis_server):
    redis_url = redis_server.url(12)
    old, seed, chat, later = ("ws://127.0.0.1:9/old", "ws://127.0.0.1:9/seed", "ws://127.0.0.1:9/chat",
                              "ws://127.0.0.1:9/later")
    before_routes = processes.proxy("--redis-url", redis_url, "--backend", old)  # data written without routes
    assert in_pools(before_routes) == {"default": [old]}
    given = ("--redis-url", redis_url, "--route", f"/chat={chat}", "--backend", seed)
    first = processes.proxy(*given)
    assert in_pools(first) == {"default": [old], "/chat": [chat]}  # the existing set wins over the seed
    assert first.admin("DELETE", {"url": chat, "pool": "/chat"})[0] == 200
    assert first.admin("POST", {"url": later, "pool": "/chat"})[0] == 201
    # a process (re)started with the same routes takes the route's pool as Redis has it
    again = processes.proxy(*given)
    assert in_pools(again) == {"default": [old], "/chat": [later]}
    # the process without routes is unaffected by the route's pool, and shares the default one
    assert first.admin("POST", {"url": seed})[0] == 201
    wait_for(lambda: in_pools(before_routes) == {"default": [old, seed]}, timeout=5, what="the add in the default pool")
    wait_for(lambda: in_pools(again)["default"] == [old, seed], timeout=5, what="the add in the restarted process")
