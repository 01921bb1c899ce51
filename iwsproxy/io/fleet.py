"""The session directory: which process of a fleet holds which session, and the sessions at rest,
kept in Redis.

What is in Redis (``P`` is the key prefix, ``K`` a session key: a client id, or
``"<route prefix> <client id>"``)::

    P:proc:<id>       a live process: JSON {"address", "host", "pid"}; expires after ttl_s unless refreshed
    P:holder:K        the id of the process holding session K; expires after ttl_s unless refreshed
    P:snap:K          a list of one item: the snapshot of session K at rest (evacuated or moving),
                      expiring with the resume grace
    P:ready:K         a list: "1" pushed when a snapshot of K is saved (woken waiters BLPOP it); 10 s
    channel P:release:<id>  session keys that process <id> is asked to hand over (a client of
                      theirs reconnected to another process)

Exactly one. A process takes a session with one script (:data:`_TAKE`): it pops the snapshot at
rest and records itself as the holder, or learns the holder, or, if there is neither, records
itself as the holder of a new session. Two processes asked for the same session at once get it
once: the other learns who holds it (and asks it to hand the session over, or refuses).
Saving a snapshot (:data:`_SAVE`) drops the holder record in the same script, so there is never a
moment when a session is at rest and unknown.

Refreshing. Each process refreshes its own record and those of the sessions it holds every
``ttl_s / 3`` (pipelined), so the records of a process that dies without a word expire within
``ttl_s``; a holder whose process record has gone is taken as dead.

Needs gevent monkey-patching (``iwsproxy serve``, ``wsgi.py``, gunicorn's gevent workers) so that
redis-py's sockets cooperate with the other greenlets.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from typing import Callable, Iterable

import redis
from gevent.event import Event
from gevent.pool import Group
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from ..exceptions import ConfigError

__all__ = ["SessionDirectory", "RedisError"]

log = logging.getLogger(__name__)

READY_TTL_MS = 10_000

# KEYS: snap, holder, ready. ARGV: me, ttl ms. -> {1, snapshot} taken; {2, holder} held elsewhere (or
# by me); {0, ""} nothing known: recorded as mine (a new session)
_TAKE = """
local snap = redis.call('LPOP', KEYS[1])
if snap then
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {1, snap}
end
local holder = redis.call('GET', KEYS[2])
if holder then return {2, holder} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {0, ''}
"""
# KEYS: snap, holder, ready. ARGV: me, snapshot, grace ms. The first write is the RPUSH: a script's
# first write is where Redis refuses it when out of memory (later ones are let through).
_SAVE = """
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -1, -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('DEL', KEYS[3])
redis.call('RPUSH', KEYS[3], '1')
redis.call('PEXPIRE', KEYS[3], %d)
return 1
""" % READY_TTL_MS
# KEYS: holder. ARGV: holder id. Deletes the record only if it names that holder.
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SessionDirectory:
    """This process's view of the fleet's session directory in Redis (see the module docstring).

    ``address`` is what the process advertises (shown on status pages). Calls that answer a
    request (:meth:`take`, :meth:`save`...) raise :class:`RedisError` when Redis fails; the
    refresher greenlet logs and retries.
    """

    def __init__(self, url: str, *, address: str, key_prefix: str = "iwsproxy", ttl_s: float = 30.0,
                 timeout_s: float = 2.0):
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                               retry=Retry(NoBackoff(), 0), health_check_interval=0, protocol=2)
        except ValueError as exc:
            raise ConfigError("IWSPROXY_REDIS_URL", url, "settings", str(exc)) from exc
        self._url = url
        self.address = address
        self.id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._prefix = key_prefix
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._take = self._redis.register_script(_TAKE)
        self._save = self._redis.register_script(_SAVE)
        self._forget = self._redis.register_script(_FORGET)
        self._held: set[str] = set()        # keys this process holds (refreshed)
        self._gone: set[str] = set()        # keys it let go of, their records not deleted yet
        self._group = Group()
        self._stopping = Event()
        self._wake = Event()
        self._on_release: Callable[[str], None] | None = None

    # ---- keys ----
    def _k(self, kind: str, key: str) -> str:
        return f"{self._prefix}:{kind}:{key}"

    @property
    def channel(self) -> str:
        return f"{self._prefix}:release:{self.id}"

    # ---- life cycle ----
    def start(self, on_release: Callable[[str], None]) -> None:
        """Register this process and start its refresher and its listener for hand-over requests
        (``on_release(key)`` is called in the listener's greenlet)."""
        self._on_release = on_release
        self._group.spawn(self._refresh_loop)
        self._group.spawn(self._listen_loop)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop refreshing and listening, and remove this process's record (best effort)."""
        self._stopping.set()
        self._wake.set()
        self._group.kill(timeout=timeout)
        try:
            self._redis.delete(self._k("proc", self.id))
        except RedisError as exc:
            log.warning("session directory: could not remove this process's record: %s", exc)

    # ---- the sessions this process holds ----
    def hold(self, key: str) -> None:
        """This process now holds ``key`` (recorded by the refresher, soon)."""
        self._gone.discard(key)
        if key not in self._held:
            self._held.add(key)
            self._wake.set()

    def let_go(self, key: str) -> None:
        """This process no longer holds ``key`` (its record is deleted by the refresher, if it is ours)."""
        if key in self._held:
            self._held.discard(key)
            self._gone.add(key)
            self._wake.set()

    def drop(self, key: str) -> None:
        """Forget ``key`` here without touching Redis (its record was moved on by a script)."""
        self._held.discard(key)
        self._gone.discard(key)

    def held_count(self) -> int:
        return len(self._held)

    # ---- one session ----
    def take(self, key: str) -> tuple[str, object]:
        """Take session ``key``: ("snapshot", bytes) popped from rest, now recorded as ours;
        ("held", holder id) held by a process (perhaps this one); or ("new", None): nothing was
        known, it is recorded as ours."""
        found, value = self._take(keys=[self._k("snap", key), self._k("holder", key), self._k("ready", key)],
                                  args=[self.id, int(self.ttl_s * 1000)])
        if found == 1:
            self._held.add(key)
            return "snapshot", bytes(value)
        if found == 2:
            return "held", value.decode()
        self._held.add(key)
        return "new", None

    def known(self, key: str) -> bool:
        """Is session ``key`` at rest, or held by another process?"""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self._k("snap", key))
            pipe.get(self._k("holder", key))
            at_rest, holder = pipe.execute()
        return bool(at_rest) or (holder is not None and holder.decode() != self.id)

    def alive(self, holder: str) -> bool:
        """Is the process ``holder`` alive (its record refreshed)?"""
        return bool(self._redis.exists(self._k("proc", holder)))

    def forget_holder(self, key: str, holder: str) -> None:
        """Delete the record of ``key`` if it still names ``holder`` (a process found dead)."""
        self._forget(keys=[self._k("holder", key)], args=[holder])

    def ask_release(self, holder: str, key: str) -> int:
        """Ask process ``holder`` to hand session ``key`` over; the number of its listeners (0:
        it is not listening)."""
        return self._redis.publish(f"{self._prefix}:release:{holder}", key)

    def wait_saved(self, key: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a snapshot of ``key`` to be saved (False: none was)."""
        if timeout_s <= 0:
            return False
        waiter = redis.Redis.from_url(self._url, socket_connect_timeout=self.timeout_s,
                                      socket_timeout=timeout_s + self.timeout_s, retry=Retry(NoBackoff(), 0),
                                      protocol=2)
        try:
            return waiter.blpop([self._k("ready", key)], timeout=max(0.01, round(timeout_s, 2))) is not None
        finally:
            waiter.close()

    def save(self, items: Iterable[tuple[str, bytes]], grace_s: float) -> list[str]:
        """Put sessions at rest for ``grace_s``: each (key, snapshot), in one round trip. Their
        holder records (ours) go in the same script. Returns the keys Redis refused (out of
        memory...); raises :class:`RedisError` if Redis cannot be reached."""
        grace_ms = max(1, int(grace_s * 1000))
        with self._redis.pipeline(transaction=False) as pipe:
            keys = []
            for key, snapshot in items:
                keys.append(key)
                self._save(keys=[self._k("snap", key), self._k("holder", key), self._k("ready", key)],
                           args=[self.id, snapshot, grace_ms], client=pipe)
            results = pipe.execute(raise_on_error=False)
        refused = []
        for key, result in zip(keys, results):
            if isinstance(result, Exception):
                if not isinstance(result, redis.ResponseError):
                    raise result
                refused.append(key)
                log.warning("session directory: Redis refused the session %s: %s", key[:8], result)
            self.drop(key)
        return refused

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except RedisError:
            return False

    def memory_used(self) -> int:
        """Redis's ``used_memory`` (bytes)."""
        return int(self._redis.info("memory")["used_memory"])

    # ---- greenlets ----
    def _refresh_loop(self) -> None:
        interval = self.ttl_s / 3
        failing = False
        while not self._stopping.is_set():
            try:
                self._refresh()
                if failing:
                    log.info("session directory: Redis reachable again")
                failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("session directory: cannot refresh the records in Redis: %s", exc)
                failing = True
            self._wake.clear()
            self._wake.wait(interval)

    def _refresh(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        record = json.dumps({"address": self.address, "host": socket.gethostname(), "pid": os.getpid()})
        gone, held = list(self._gone), list(self._held)
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._k("proc", self.id), record, px=ttl_ms)
            for key in held:
                pipe.set(self._k("holder", key), self.id, px=ttl_ms)
            for key in gone:
                self._forget(keys=[self._k("holder", key)], args=[self.id], client=pipe)
            pipe.execute()
        self._gone.difference_update(gone)

    def _listen_loop(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                delay = 0.1
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message" and self._on_release is not None:
                        self._on_release(message["data"].decode())
            except RedisError as exc:
                log.warning("session directory: listening for hand-over requests failed: %s", exc)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                pubsub.close()
