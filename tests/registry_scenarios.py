"""Two workers' registries in one monkey-patched process, for orderings a test must force.

``python tests/registry_scenarios.py REDIS_URL SCENARIO`` runs one scenario and prints
its outcome as one JSON line. Two ``PipeManager`` objects with their own
``RedisRegistry`` stand for two workers; each records every change it applies
(and can be told to hold them unread), so the test waits on events, not on time.
It runs in a child because redis-py's sockets cooperate with the registry's
greenlet only under gevent's monkey-patching, done once, here, first thing.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

from gevent.event import Event  # noqa: E402
from gevent.queue import Queue  # noqa: E402

import redis  # noqa: E402

from iwsproxy.io.manager import PipeManager  # noqa: E402
from iwsproxy.io.redis_registry import RedisRegistry  # noqa: E402
from iwsproxy.settings import Settings  # noqa: E402

TIMEOUT_S = 5.0
U = "ws://127.0.0.1:9/u"
V = "ws://127.0.0.1:9/v"


class Worker:
    """A manager and its registry; ``applied`` gets each change after it is applied, ``connected`` each connect."""

    def __init__(self, redis_url: str, heartbeat_s: float = 5.0):
        self.registry = RedisRegistry(redis_url, heartbeat_s=heartbeat_s, reconnect_initial_s=0.01,
                                      reconnect_max_s=0.1)
        self.applied: Queue = Queue()
        self.connected: Queue = Queue()
        self.reading = Event()
        self.reading.set()
        apply, connect = self.registry._apply, self.registry._connect

        def held_apply(data: str) -> None:
            self.reading.wait(TIMEOUT_S)  # cleared: the change is read but not applied yet
            apply(data)
            self.applied.put(json.loads(data))

        def told_connect():
            pubsub = connect()
            self.connected.put(True)
            return pubsub

        self.registry._apply, self.registry._connect = held_apply, told_connect
        self.manager = PipeManager(Settings(), registry=self.registry)
        self.connected.get(timeout=TIMEOUT_S)
        self.drains_applied = 0
        apply_drain = self.manager.apply_drain

        def counted_drain(url: str, window_s: float):
            self.drains_applied += 1
            return apply_drain(url, window_s)

        self.manager.apply_drain = counted_drain

    def wait_applied(self, op: str, url: str) -> None:
        """Block until this worker has applied ``op`` of ``url`` (queue.Empty after TIMEOUT_S)."""
        while True:
            change = self.applied.get(timeout=TIMEOUT_S)
            if (change["op"], change["url"]) == (op, url):
                return

    def urls(self) -> list[str]:
        return self.manager.pool.urls()


def own_change_after_an_older_add(redis_url: str, op: str) -> dict:
    """A adds U and at once drains (or removes) it; A reads its own add's echo only after that."""
    a, b = Worker(redis_url), Worker(redis_url)
    a.reading.clear()
    a.manager.add_backend(U)
    if op == "drain":
        a.manager.drain_backend(U, 0)
    else:
        a.manager.remove_backend(U)
    a.reading.set()
    a.wait_applied(op, U)
    b.wait_applied(op, U)
    return {"a": a.urls(), "b": b.urls()}


def own_drain(redis_url: str) -> dict:
    return own_change_after_an_older_add(redis_url, "drain")


def own_remove(redis_url: str) -> dict:
    return own_change_after_an_older_add(redis_url, "remove")


def rejected_drain(redis_url: str) -> dict:
    """A drain Redis rejects (its marker's expiry is out of range) is dropped: A reconnects and syncs on."""
    a, b = Worker(redis_url), Worker(redis_url)
    a.manager.add_backend(U)
    b.wait_applied("add", U)
    a.registry.drain(U, 1e16)  # past the manager's check, as a registry of its own would be called
    redis.Redis.from_url(redis_url).client_kill_filter(_type="pubsub")
    a.connected.get(timeout=TIMEOUT_S)  # a change kept for retry would fail each reconnect
    b.connected.get(timeout=TIMEOUT_S)
    a.manager.add_backend(V)
    b.wait_applied("add", V)
    return {"a": a.urls(), "b": b.urls()}


def drain_then_add_back(redis_url: str) -> dict:
    """A drains U and adds it back before it reads its drain's echo: the add, made after, wins."""
    a, b = Worker(redis_url), Worker(redis_url)
    a.manager.add_backend(U)
    a.wait_applied("add", U)
    b.wait_applied("add", U)
    a.reading.clear()
    a.manager.drain_backend(U, 0)
    a.manager.add_backend(U)
    a.reading.set()
    a.wait_applied("add", U)  # the echo of the add, read after that of the drain
    b.wait_applied("add", U)
    return {"a": a.urls(), "b": b.urls(), "drains_applied_in_a": a.drains_applied}


def add_while_redis_is_out_of_memory(redis_url: str) -> dict:
    """An add that Redis refuses for want of memory is kept, and written once memory is back."""
    a, b = Worker(redis_url, heartbeat_s=0.1), Worker(redis_url)
    admin = redis.Redis.from_url(redis_url)
    admin.config_set("maxmemory", 1)  # every write now fails with OOM
    try:
        a.manager.add_backend(U)
    finally:
        admin.config_set("maxmemory", 0)
    b.wait_applied("add", U)  # written at A's next heartbeat
    return {"a": a.urls(), "b": b.urls()}


SCENARIOS = {"own-drain": own_drain, "own-remove": own_remove, "rejected-drain": rejected_drain,
             "drain-then-add-back": drain_then_add_back, "oom-add": add_while_redis_is_out_of_memory}


if __name__ == "__main__":
    url, name = sys.argv[1], sys.argv[2]
    outcome = SCENARIOS[name](url)
    outcome["redis"] = redis.Redis.from_url(url, decode_responses=True).zrange("iwsproxy:backends", 0, -1)
    print(json.dumps(outcome), flush=True)
