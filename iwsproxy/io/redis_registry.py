"""A backend registry shared through Redis: every worker on every host sees the same pool (with
routes, one registry per pool: see :mod:`iwsproxy.io.redis_pools`).

What is in Redis (``P`` is ``key_prefix``, ``N`` the database number of the URL)::

    P:backends          sorted set: the registered (ready) URLs, scored by insertion order
    P:seq               counter that hands out those scores
    P:draining:<url>    present while <url> drains (value: the window in s; expires window + 60 s)
    P:epoch             random id written when the data set is first used (see "Redis lost its data")
    channel P:N:changes every change, as JSON {"op": "add"|"remove"|"drain", "url", "window_s", "origin"}

Each write and its PUBLISH run in one Lua script, so the messages come in the order
of the writes. Each process runs one subscriber greenlet, owned by the registry: it
subscribes first, then loads the set (so nothing published in between is missed;
applying a change twice is harmless, the ``apply_*`` methods are idempotent), then
blocks on the pub/sub connection and applies each change to its manager. An
admin call in this process applies the change here at once (so the answer reflects
it), writes it to Redis and publishes it; its echo is applied again harmlessly,
except a drain, which this process has already started and skips, unless an add
read in between made the URL ready again: that add was published before the drain
(this process's own, another's, or one queued while it resubscribed), so the drain
is applied again. A remove's echo is always applied, so it too wins over an older
add read after the removal. A drained URL leaves the sorted set when the drain is published; each process drops it from its
pool when its last pipe has moved. Error counts and ejection stay per process (they
live in each process's pool).

Redis down. The process keeps proxying with the last pool it knew. The subscriber
reconnects with exponential backoff and jitter; once back it *reconciles*: it loads
the set and adds the URLs it lacks, and removes (or drains, while a drain marker is
still there) the URLs that it had from the registry and that are no longer in it.
URLs put in the pool by other means (``manager.apply_add``) are left alone. A
connection that goes silent without closing is noticed by a ping sent after
``heartbeat_s`` (5 s) of quiet and left unanswered for another ``heartbeat_s``;
an admin call waits at most ``timeout_s`` (2 s) for Redis.

Admin calls while Redis is down are applied in this process, logged at WARNING and
answered (a request never fails because Redis is down); they are kept, last change
per URL, and written to Redis (and so published) as soon as it is back, before the
reconcile. The alternative, refusing the call, would make the admin API useless
exactly when an operator may need it; keeping the change local forever would leave
workers disagreeing after Redis returns. An error reply that passes (out of memory,
a replica being promoted) keeps the change the same way. A change Redis refuses
for what it is (the script's check of its arguments, a wrongly typed key) is logged
at ERROR and dropped instead: it would be refused again, and kept changes are
written before any later one, so keeping it would keep every later change local
too. The script checks its arguments before it writes, so a refused change leaves
Redis as it was.

Backends given at start (``IWSPROXY_BACKENDS``, ``--backend``) are not admin adds:
they only seed a new data set, the way a lost one is seeded (below). A worker that
gunicorn respawns with the same settings would otherwise add back, in every
process, the backends an operator removed or drained since. If Redis cannot be
reached at start, the process serves with them until it can, then reconciles.

Redis lost its data (restarted without persistence, or flushed). Removing every URL
missing from an empty set would empty every pool. So the first process to reconnect
to a data set without ``P:epoch`` writes a new epoch and seeds the set with the URLs
it had from the registry (in one script, which publishes each as an add: after a
FLUSHALL the running processes keep their connections and never look again); the
others then find the epoch and reconcile against that set. A process with no URLs
to seed leaves the epoch unwritten, so that one started without backends (an admin
instance, a canary) does not keep the next one from seeding. To empty the registry, remove the backends through the
admin API rather than deleting the keys.

Needs gevent monkey-patching (``iwsproxy serve``, ``wsgi.py`` and gunicorn's gevent
workers do it) so that redis-py's sockets cooperate with the other greenlets.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from gevent.event import Event
from gevent.pool import Group
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError, TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..backoff import backoff
from ..exceptions import ConfigError
from ..settings import MAX_DRAIN_WINDOW_S
from .registry import drain_undone, url_from_peer

if TYPE_CHECKING:
    from .manager import PipeManager

__all__ = ["RedisRegistry"]

log = logging.getLogger(__name__)

DRAIN_MARKER_GRACE_S = 60.0  # a drain marker outlives its window by this much
_MAX_MARKER_TTL_MS = (MAX_DRAIN_WINDOW_S + DRAIN_MARKER_GRACE_S) * 1000  # longer: rejected before any write

# KEYS: backends, seq, drain marker. ARGV: op, url, message, channel, known here (1/0), window_s, marker ttl ms,
# longest marker ttl ms. Returns 1 if the set changed (add: the URL was new; remove/drain: it was there).
# A drain's ttl is checked before anything is written: a script's writes are not undone by a later error.
_CHANGE = """
local op, url = ARGV[1], ARGV[2]
if op == 'drain' then
  local ttl = tonumber(ARGV[7])
  if not ttl or ttl ~= ttl or ttl < 1 or ttl > tonumber(ARGV[8]) then
    return redis.error_reply('ERR drain marker ttl out of range: ' .. ARGV[7])
  end
end
local changed = 0
if op == 'add' then
  if not redis.call('ZSCORE', KEYS[1], url) then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), url)
    changed = 1
  end
  redis.call('DEL', KEYS[3])
else
  changed = redis.call('ZREM', KEYS[1], url)
  if changed == 0 and ARGV[5] ~= '1' then
    return 0
  end
  if op == 'drain' then
    redis.call('SET', KEYS[3], ARGV[6], 'PX', math.floor(tonumber(ARGV[7])))
  else
    redis.call('DEL', KEYS[3])
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[3])
return changed
"""

# KEYS: epoch, backends, seq. ARGV: new epoch, channel, origin, then the URLs to seed if the
# epoch is missing. Returns {epoch, number of URLs seeded}; {false, 0} if the epoch is missing and
# there is nothing to seed: a process with no backends does not claim an empty set, which would keep
# the next process from seeding it. Each URL seeded is published as an add, so that the processes
# already running (which never saw the data set go: a FLUSHALL closes no connection) get it too.
_CLAIM_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if epoch then
  return {epoch, 0}
end
if #ARGV < 4 then
  return {false, 0}
end
redis.call('SET', KEYS[1], ARGV[1])
local seeded = 0
for i = 4, #ARGV do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[i])
    redis.call('PUBLISH', ARGV[2], cjson.encode({op = 'add', url = ARGV[i], window_s = 0, origin = ARGV[3]}))
    seeded = seeded + 1
  end
end
return {ARGV[1], seeded}
"""


def _redacted(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://host:6379/0`` for logs."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


class _PubSubSilent(RedisError):
    """The pub/sub connection stopped answering (no reply to a ping within a heartbeat)."""


_REFUSALS = ("drain marker ttl out of range", "WRONGTYPE")  # what sending again would meet again


def _rejected(exc: BaseException) -> bool:
    """Did Redis refuse the change itself (the script's check of its arguments, a wrongly typed key)?

    Sending it again would fail again, and a change kept for retry blocks every
    later one, so such a change is dropped. Every other error reply says nothing
    about the change and passes (out of memory, a replica being promoted, a busy
    script, a missing script): the change is kept and written later.
    """
    return isinstance(exc, ResponseError) and any(refusal in str(exc) for refusal in _REFUSALS)


class RedisRegistry:
    """The :class:`~iwsproxy.io.registry.Registry` shared by every process using one Redis.

    See the module docstring for the data, the propagation and the behaviour while
    Redis is down.
    """

    def __init__(self, url: str, *, key_prefix: str = "iwsproxy", heartbeat_s: float = 5.0,
                 timeout_s: float = 2.0, reconnect_initial_s: float = 0.1, reconnect_max_s: float = 5.0):
        try:
            # no retries inside redis-py: a lost connection must reach us, to reconcile after it;
            # RESP2: the pub/sub replies every Redis and every redis-py >= 5 agree on
            self._redis = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=timeout_s,
                                               socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                                               health_check_interval=0, protocol=2)
        except ValueError as exc:
            raise ConfigError("IWSPROXY_REDIS_URL", url, "settings", str(exc)) from exc
        self.url = _redacted(url)
        db = self._redis.connection_pool.connection_kwargs.get("db", 0)
        self._key_backends = f"{key_prefix}:backends"
        self._key_seq = f"{key_prefix}:seq"
        self._key_epoch = f"{key_prefix}:epoch"
        self._marker_prefix = f"{key_prefix}:draining:"
        # pub/sub ignores database numbers: the number goes into the channel name
        self.channel = f"{key_prefix}:{db}:changes"
        self._change = self._redis.register_script(_CHANGE)
        self._claim_epoch = self._redis.register_script(_CLAIM_EPOCH)
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self._reconnect_initial_s = reconnect_initial_s
        self._reconnect_max_s = reconnect_max_s
        self._origin = uuid.uuid4().hex
        self._manager: "PipeManager | None" = None
        self._registered: dict[str, None] = {}  # URLs this process has from the registry, in order
        self._unsent: dict[str, tuple[str, float]] = {}  # url -> (op, window_s) not yet written to Redis
        self._epoch: str | None = None
        self._own_drains: set[str] = set()  # drained here, their echo not read yet
        self._group = Group()  # the subscriber greenlet
        self._stopping = Event()
        self.connected = False

    # ---- Registry protocol ----
    def start(self, manager: "PipeManager", backends: tuple[str, ...] = ()) -> None:
        """Load the registered set into ``manager`` and start the subscriber greenlet.

        ``backends`` (those given at start) only seed a new data set; a registry that
        exists keeps its set, so a (re)started worker does not bring back what was
        removed or drained. If Redis cannot be reached the process serves with
        ``backends`` until it is, then reconciles, and the subscriber keeps trying.
        """
        if self._manager is not None:
            raise RuntimeError("RedisRegistry already started")
        self._manager = manager
        self._registered = dict.fromkeys(backends)  # the seed of _CLAIM_EPOCH; reconciled away otherwise
        pubsub = lost_at = None
        try:
            pubsub = self._connect()
        except RedisError as exc:
            for url in self._registered:
                manager.apply_add(url)
            lost_at = time.monotonic()
            log.warning("registry: Redis at %s unreachable at start (%s); serving with the backends given "
                        "at start, reconnecting in the background", self.url, exc)
        else:
            log.info("registry: connected to Redis at %s, channel %s: %d backends", self.url, self.channel,
                     len(self._registered))
        listener = self._group.spawn(self._run, pubsub, lost_at)
        listener.link_exception(lambda g: log.error("registry subscriber crashed", exc_info=g.exc_info))

    def add(self, url: str) -> bool:
        """Register ``url`` everywhere; True if it was new in Redis (in this process if Redis is down)."""
        self._own_drains.discard(url)  # added back after a drain of ours: the add is the newer
        added_here = self._manager.apply_add(url)
        changed = self._write("add", url, known_here=True)
        if changed is None:
            return added_here
        self._registered[url] = None
        return bool(changed)

    def remove(self, url: str) -> bool:
        """Unregister ``url`` everywhere; True if Redis or this process had it."""
        removed_here = self._manager.apply_remove(url)
        changed = self._write("remove", url, known_here=removed_here or url in self._registered)
        if changed is not None:
            self._registered.pop(url, None)
        return removed_here or bool(changed)

    def drain(self, url: str, window_s: float) -> int | None:
        """Drain ``url`` in every process; this process's pipes to move (0 if only Redis had it), None if unknown."""
        moving = self._manager.apply_drain(url, window_s)
        self._own_drains.add(url)
        changed = self._write("drain", url, known_here=moving is not None or url in self._registered,
                              window_s=window_s)
        if changed is not None:
            self._registered.pop(url, None)
        if moving is None and changed:
            return 0
        return moving

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the subscriber and close the connections; True if it ended within ``timeout``."""
        self._stopping.set()
        self._group.kill(timeout=timeout)  # GreenletExit interrupts a blocking read; its finally closes pub/sub
        stopped = len(self._group) == 0
        self._redis.close()
        self.connected = False
        return stopped

    # ---- writing ----
    def _write(self, op: str, url: str, *, known_here: bool, window_s: float = 0.0) -> int | None:
        """Write one change to Redis and publish it; None if it had to be kept for later."""
        if not self.connected:
            return self._keep(op, url, window_s, "not connected")
        try:
            return self._send(op, url, known_here=known_here, window_s=window_s)
        except RedisError as exc:
            if _rejected(exc):
                return self._drop(op, url, exc)
            return self._keep(op, url, window_s, exc)

    def _send(self, op: str, url: str, *, known_here: bool, window_s: float = 0.0) -> int:
        message = json.dumps({"op": op, "url": url, "window_s": window_s, "origin": self._origin})
        marker_ttl_ms = (float(window_s) + DRAIN_MARKER_GRACE_S) * 1000  # any float: the script checks it
        return int(self._change(keys=[self._key_backends, self._key_seq, self._marker_prefix + url],
                                args=[op, url, message, self.channel, "1" if known_here else "0",
                                      repr(float(window_s)), repr(marker_ttl_ms), _MAX_MARKER_TTL_MS]))

    def _keep(self, op: str, url: str, window_s: float, cause: object) -> None:
        self._unsent.pop(url, None)  # keep the last change per URL, in the order made
        self._unsent[url] = (op, window_s)
        log.warning("registry: Redis at %s unavailable (%s): %s of backend %s applied in this process only; "
                    "it will be written to Redis when it is back", self.url, cause, op, url)
        return None

    def _drop(self, op: str, url: str, exc: RedisError) -> None:
        log.error("registry: Redis at %s rejected the %s of backend %s (%s): applied in this process only, "
                  "not kept (it would be rejected again)", self.url, op, url, exc)
        return None

    def _send_unsent(self) -> None:
        """Write the changes kept while Redis was unavailable, oldest first (dropping any Redis rejects)."""
        while self._unsent:
            url, (op, window_s) = next(iter(self._unsent.items()))
            del self._unsent[url]
            try:
                self._send(op, url, known_here=True, window_s=window_s)
            except BaseException as exc:
                if _rejected(exc):
                    self._drop(op, url, exc)
                    continue
                self._unsent.setdefault(url, (op, window_s))  # unless a newer change was kept meanwhile
                raise
            if op == "add":
                self._registered[url] = None
            else:
                self._registered.pop(url, None)
            log.info("registry: wrote the kept %s of backend %s to Redis", op, url)

    # ---- the subscriber ----
    def _connect(self):
        """Subscribe, then bring the process in line with Redis; returns the subscribed pub/sub."""
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self.channel)
            confirmation = pubsub.get_message(timeout=self.timeout_s)
            if confirmation is None or confirmation["type"] != "subscribe":
                raise RedisTimeoutError(f"no subscribe confirmation within {self.timeout_s} s")
            self._sync()
            self._send_unsent()  # changes kept while _sync waited on Redis
        except BaseException:
            pubsub.close()
            raise
        self.connected = True  # no yield since _send_unsent found nothing left: nothing kept in between
        return pubsub

    def _sync(self) -> None:
        """Seed a lost data set, write kept changes, then reconcile the pool."""
        epoch, seeded = self._claim_epoch(keys=[self._key_epoch, self._key_backends, self._key_seq],
                                          args=[uuid.uuid4().hex, self.channel, self._origin, *self._registered])
        self._log_claim(epoch, int(seeded))
        self._epoch = epoch
        self._send_unsent()
        present = self._redis.zrange(self._key_backends, 0, -1)
        present_set = set(present)
        gone = [url for url in self._registered if url not in present_set]
        markers = self._redis.mget([self._marker_prefix + url for url in gone]) if gone else []
        # no yield from here on: the pool changes in one step
        for url in present:
            if self._valid(url):
                self._registered[url] = None
                self._manager.apply_add(url)
        for url, marker in zip(gone, markers):
            self._registered.pop(url, None)
            if marker is not None:  # drained while this process was away: move its pipes too
                self._manager.apply_drain(url, float(marker))
            else:
                self._manager.apply_remove(url)

    def _log_claim(self, epoch: str, seeded: int) -> None:
        if self._epoch is None:  # this process's first connection: it has only the backends given at start
            if seeded:
                log.info("registry: Redis at %s had no backend set; seeded it with the %d backends given at start",
                         self.url, seeded)
            elif self._registered:
                log.info("registry: Redis at %s has a backend set already; the backends given at start only "
                         "seed a new one (change it through the admin API)", self.url)
        elif seeded or epoch != self._epoch:
            log.warning("registry: Redis at %s had lost the backend set; %s", self.url,
                        f"seeded it with the {seeded} backends this process had" if seeded
                        else "another process has seeded it" if epoch else "this process had none to seed it")

    def _run(self, pubsub, lost_at: float | None) -> None:
        """Listen; on loss, keep the pool and reconnect with backoff until stopped."""
        delays = None
        while not self._stopping.is_set():
            try:
                if pubsub is None:
                    before = set(self._manager.pool.urls())
                    pubsub = self._connect()
                    after = set(self._manager.pool.urls())
                    log.info("registry: connected to Redis at %s again after %.1f s: %d backends (+%d -%d)",
                             self.url, time.monotonic() - lost_at, len(self._registered),
                             len(after - before), len(before - after))
                    lost_at = None
                delays = None
                self._listen(pubsub)
            except RedisError as exc:
                if lost_at is None:
                    log.warning("registry: lost Redis at %s (%s); keeping the last known pool of %d backends, "
                                "reconnecting", self.url, exc, len(self._manager.pool))
                    lost_at = time.monotonic()
                else:
                    log.debug("registry: Redis at %s still unavailable: %s", self.url, exc)
            except Exception:
                log.error("registry: unexpected error; reconnecting", exc_info=True)
                lost_at = lost_at if lost_at is not None else time.monotonic()
            finally:
                self.connected = False
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
            if delays is None:
                delays = backoff(initial_s=self._reconnect_initial_s, max_s=self._reconnect_max_s)
            if self._stopping.wait(next(delays)):
                return

    def _listen(self, pubsub) -> None:
        """Block on the pub/sub connection and apply each change; raises RedisError on loss.

        An idle heartbeat sends a ping (and writes changes a failed admin call kept);
        no answer within the next heartbeat means the connection is lost.
        """
        pinged = False
        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=self.heartbeat_s)
            if message is None:
                if pinged:
                    raise _PubSubSilent(f"no answer to a ping within {self.heartbeat_s} s")
                self._send_unsent()
                pubsub.ping()
                pinged = True
                continue
            pinged = False
            if message["type"] == "message":
                self._apply(message["data"])

    def _apply(self, data: str) -> None:
        try:
            change = json.loads(data)
            op, url = change["op"], change["url"]
            window_s = float(change.get("window_s") or 0.0)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("registry: ignoring a malformed message %.200r: %s", data, exc)
            return
        if not self._valid(url):
            return
        if op == "add":
            self._registered[url] = None
            self._manager.apply_add(url)
        elif op == "remove":
            self._registered.pop(url, None)
            self._manager.apply_remove(url)
        elif op == "drain":
            self._registered.pop(url, None)
            if change.get("origin") != self._origin or self._undone_here(url):
                self._manager.apply_drain(url, window_s)
        else:
            log.warning("registry: ignoring a message with unknown op %.200r", data)

    def _undone_here(self, url: str) -> bool:
        return drain_undone(self._own_drains, self._manager, url)

    @staticmethod
    def _valid(url: object) -> bool:
        return url_from_peer(url, "Redis")
