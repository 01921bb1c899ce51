"""PipeManager: the pipes of one process by client id, and the backend pools they lease from."""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Callable

import gevent
from gevent.event import Event
from gevent.pool import Group

from ..exceptions import BufferOverflow, CapacityExceeded, ConfigError, DuplicateClient, ResumeRefused
from ..buffer import Budget
from ..frames import MaskSource
from ..pool import Backend, BackendPool
from ..routes import DEFAULT_POOL, pool_for_path, pool_seeds
from ..metrics import Metrics
from ..settings import Settings, check_drain_window
from ..tokens import verify
from .backend import ClientOffer, check_backend_url, tls_options
from .carry import restore_detached
from .client import ClientUpgrade, ProxyHandler
from .connection import Connection
from .handoff import Handoff, prefixed_reader
from .pipe import PersistentPipe, short_id
from .pools import OnePool, PoolLeases
from .ports import BackendOptions, Telemetry
from .registry import LocalRegistry, Registry

if TYPE_CHECKING:
    from .evacuate import Fleet
    from .fleet import SessionDirectory

__all__ = ["PipeManager"]

log = logging.getLogger(__name__)


class PipeManager:
    """Owns the live :class:`PersistentPipe` objects and the backend pools.

    The pools are those of :func:`~iwsproxy.routes.pool_seeds`: the default one
    (the catch-all: the ``backends`` given here and in settings, or a catch-all
    route's URLs; also ``self.pool``) unless routes are set without a
    catch-all, and one per other route of ``settings.routes``, named by its
    prefix; each is a :class:`PoolLeases` in ``self.leases``. Each pool has its
    own registry (``self.registries``): ``registry`` for the default pool and
    ``pool_registry(name)`` for a route's (both :class:`LocalRegistry` if not
    given); changes through the public methods go through it. Methods taking
    ``pool`` raise KeyError for a name that is not one of these. A session is one
    client id in one pool: the same id on two routes is two sessions.

    All methods are called from greenlets of one process and never yield while
    they change shared state, so no locks are needed.
    """

    def __init__(self, settings: Settings | None = None, *, backends: list[str] | tuple[str, ...] = (),
                 registry: Registry | None = None, metrics: Metrics | None = None,
                 pool_registry: Callable[[str], Registry] | None = None,
                 directory: "SessionDirectory | None" = None):
        self.settings = s = settings or Settings()
        self.metrics = metrics or Metrics()
        self.budget = Budget(s.global_buffer_limit_bytes)  # bytes held for all pipes together
        self.backend_sslopt = tls_options(verify=s.backend_tls_verify, ca_bundle=s.backend_ca_bundle)
        self.mask_source = MaskSource()  # one pool of random mask keys for every backend connection
        self._pipes: dict[str, PersistentPipe] = {}  # by session key (see _session_key)
        self._per_ip: Counter = Counter()  # live pipes per client address
        self._tasks = Group()          # drain schedulers
        self._greenlets = Group()      # pipe supervisors and the requests handed in by peers
        self._timers = Group()         # the calls of call_later, until they are made
        self._closing = Event()
        self._shutdown: gevent.Greenlet | None = None
        self._server_pools: set = set()  # the pools of the servers whose requests opened pipes
        self._http_server = None         # the server that handed us requests (serves handed-in ones too)
        self.handoff: Handoff | None = None
        self._refused_moves: weakref.WeakSet = weakref.WeakSet()  # pipes a successor refused: not asked again
        if s.handoff_dir:
            if not os.path.isdir(s.handoff_dir):
                raise ConfigError("IWSPROXY_HANDOFF_DIR", s.handoff_dir, "settings",
                                  "not a directory (it must exist, private to the proxy's user)")
            self.handoff = Handoff(s.handoff_dir, holds=self._pipes.__contains__,
                                   serve_request=self._serve_handed_in)
        self.telemetry = Telemetry(self.metrics)
        seeds = pool_seeds(s.routes, tuple(check_backend_url(url) for url in (*s.backends, *backends)),
                           s.proxy_prefix)
        self.leases: dict[str, PoolLeases] = {
            name: PoolLeases(name, BackendPool(policy=s.pool_policy, max_failures=s.max_failures,
                                               eject_base_s=max(s.eject_base_s, 0.001),
                                               eject_max_s=max(s.eject_max_s, 0.001)), self.telemetry)
            for name in seeds}
        self._default = self.leases.get(DEFAULT_POOL)
        self.pool = self._default.pool if self._default is not None else None
        self.counters = self.telemetry.counters              # for the status page
        self.closed_by_code = self.telemetry.closed_by_code
        self._backend_options = BackendOptions(sslopt=self.backend_sslopt, mask_source=self.mask_source)
        self.registry = registry or LocalRegistry()  # the default pool's
        make_registry = pool_registry or (lambda name: LocalRegistry())
        self.registries: dict[str, Registry] = {
            name: self.registry if name == DEFAULT_POOL else make_registry(name) for name in seeds}
        # given to each registry rather than added through it: a shared one only seeds a new set with them
        for name, urls in seeds.items():
            target = self if name == DEFAULT_POOL else OnePool(self, name)
            self.registries[name].start(target, urls)
        # a fleet's session directory (see iwsproxy.io.evacuate): sessions resumed from any process
        self.fleet: "Fleet | None" = None
        if directory is not None:
            from . import evacuate  # here: it imports redis, used only then
            self.fleet = evacuate.Fleet(self, directory)
            self.fleet.start()

    # ---- backends: public calls go through the pool's registry ----
    def pool_names(self) -> list[str]:
        return list(self.leases)

    def pool_for_path(self, path: str) -> str | None:
        """The pool serving a request for ``path`` (see :func:`~iwsproxy.routes.pool_for_path`); None: 404."""
        return pool_for_path(self.settings.routes, path, has_default=self._default is not None,
                             proxy_prefix=self.settings.proxy_prefix)

    def add_backend(self, url: str, pool: str = DEFAULT_POOL) -> bool:
        """Register a backend URL (the original's ``AddConnectionToPool``); False if already there."""
        check_backend_url(url)
        return self.registries[pool].add(url)

    def remove_backend(self, url: str, pool: str = DEFAULT_POOL) -> bool:
        """Unregister a backend; pipes on it keep their connection until it drops."""
        return self.registries[pool].remove(url)

    def drain_backend(self, url: str, window_s: float | None = None, pool: str = DEFAULT_POOL) -> int | None:
        """Stop giving ``url`` new pipes and move its pipes off it, spread over ``window_s``.

        Each pipe stops writing to the backend, closes it with 1001, waits for its
        Close reply and moves to the next backend: nothing lost, nothing doubled.
        The backend leaves the pool when its last pipe has moved. Returns the
        number of this process's pipes to move, or None if ``url`` is unknown.
        A window that is not a number of seconds from 0 to a day raises
        ValueError before anything changes.
        """
        window_s = check_drain_window(self.settings.drain_window_s if window_s is None else window_s)
        return self.registries[pool].drain(url, window_s)

    # ---- backends: applying a change to this process (called by the registry) ----
    def apply_add(self, url: str, pool: str = DEFAULT_POOL) -> bool:
        """Add ``url`` to ``pool`` in this process; False if there already (KeyError: no such pool)."""
        leases = self.leases[pool]
        added = leases.pool.add(url)
        if added:
            log.info("backend %s added%s", url, _in(pool))
            leases.wake_waiting()
        return added

    def apply_remove(self, url: str, pool: str = DEFAULT_POOL) -> bool:
        removed = self.leases[pool].pool.remove(url)
        if removed:
            log.info("backend %s removed%s", url, _in(pool))
        return removed

    def apply_drain(self, url: str, window_s: float, pool: str = DEFAULT_POOL) -> int | None:
        leases = self.leases[pool]
        if url not in leases.pool:
            return None
        leases.pool.drain(url)
        pipes = [pipe for pipe in self._pipes.values() if pipe.backend_url == url and pipe.leases is leases]
        log.info("backend %s%s draining: %d pipes over %.1f s", url, _in(pool), len(pipes), window_s)
        if pipes:
            task = self._tasks.spawn(self._drain_spread, url, pipes, window_s)
            task.link_exception(lambda g: log.error("drain of %s crashed", url, exc_info=g.exc_info))
        return len(pipes)

    def _drain_spread(self, url: str, pipes: list[PersistentPipe], window_s: float) -> None:
        step = window_s / len(pipes)
        for index, pipe in enumerate(pipes):
            if index and self._closing.wait(step):  # paces the moves; shutdown interrupts
                return
            pipe.drain(url)

    def backends(self) -> list[dict]:
        """Every pool's backends, each entry naming its ``pool`` and counting its ``pipes``."""
        now = time.monotonic()
        on = Counter((_pool_of(pipe), pipe.backend_url) for pipe in self._pipes.values())
        entries = []
        for name, leases in self.leases.items():
            for entry in leases.pool.snapshot(now):
                entry["pool"] = name
                entry["pipes"] = on[name, entry["url"]]
                entries.append(entry)
        return entries

    def backend_count(self) -> int:
        """Backends in all pools together."""
        return sum(leases.pool_size() for leases in self.leases.values())

    # ---- the default pool as BackendLeases (see PoolLeases) ----
    def pool_size(self) -> int:
        return self._default.pool_size()

    def acquire_backend(self, exclude: set[str]) -> Backend | None:
        """A backend for one pipe, counted as its client until :meth:`release_backend`."""
        return self._default.acquire_backend(exclude)

    def release_backend(self, backend: Backend, *, failed: bool, cause: str = "") -> None:
        self._default.release_backend(backend, failed=failed, cause=cause)

    def backend_succeeded(self, url: str) -> None:
        self._default.backend_succeeded(url)

    def wait_for_backend(self, pipe: PersistentPipe) -> None:
        self._default.wait_for_backend(pipe)

    def stop_waiting(self, pipe: PersistentPipe) -> None:
        self._default.stop_waiting(pipe)

    # ---- pipes ----
    def pipes(self) -> list[dict]:
        """Each pipe's :meth:`PersistentPipe.info`, with the name of its ``pool``."""
        host = self.fleet.directory.address if self.fleet is not None else self.settings.advertise_address
        return [{**pipe.info(), "pool": _pool_of(pipe), "host": host or self.settings.bind}
                for pipe in self._pipes.values()]

    def __len__(self) -> int:
        return len(self._pipes)

    def open_pipe(self, client_id: str, offer: ClientOffer, pool: str = DEFAULT_POOL) -> PersistentPipe:
        """Register a pipe leasing from ``pool`` and connect its first backend, before the client is answered.

        Raises :class:`DuplicateClient` (409), :class:`BackendRejected` (that
        status) or :class:`NoBackendAvailable` (503).
        """
        leases = self.leases[pool]
        key = _session_key(pool, client_id)
        if key in self._pipes:
            raise DuplicateClient(f"client {short_id(client_id)} already has a live session")
        if self._closing.is_set():  # too late for the shutdown's 1012: refused before the upgrade
            raise CapacityExceeded("this process is shutting down", 503)
        settings = self.settings
        if len(self._pipes) >= settings.max_pipes:
            raise CapacityExceeded(f"this process serves its maximum of {settings.max_pipes} pipes", 503)
        if settings.max_pipes_per_ip and offer.remote_addr and self._per_ip[offer.remote_addr] >= settings.max_pipes_per_ip:
            raise CapacityExceeded(f"too many sessions from this address (max {settings.max_pipes_per_ip})", 429)
        pipe = PersistentPipe(client_id, offer, settings=settings, leases=leases, telemetry=self.telemetry,
                              budget=self.budget, backend_options=self._backend_options, on_ended=self.pipe_ended,
                              supervisors=self._greenlets)
        self._pipes[key] = pipe
        self._per_ip[offer.remote_addr] += 1
        try:
            allow_waiting = self.settings.wait_for_backend and self.settings.pool_policy == "exclusive"
            pipe.connect_first(allow_waiting=allow_waiting)
        except BaseException:
            self.abandon_pipe(pipe)
            raise
        return pipe

    def adopt_session(self, snapshot: bytes) -> PersistentPipe | None:
        """Serve a session exported by another process (:func:`~iwsproxy.io.carry.export_pipe`),
        detached: registered under its key, with no client and no backend connection yet.

        The pipe connects a backend as a failover does (the backend sees
        ``X-Iwsproxy-Reconnects`` go up and first gets what the last one had not acknowledged,
        then what was buffered for it); its client resumes it as any detached session (same id,
        a token with ``--resume-secret``, the same subprotocol) and gets what it had not
        acknowledged, then what was held for it, then live traffic; unresumed, it ends with the
        resume grace, counted from when the client was detached (at the latest, the export).
        This process's settings apply (buffer cap, grace, timeouts).

        Returns the pipe, or None if the session has ended meanwhile (its grace ran out, or
        resume is off here). Raises :class:`SnapshotError` for a snapshot that is not valid,
        KeyError for a pool this process does not have, :class:`DuplicateClient` if a live
        pipe holds the key, :class:`CapacityExceeded` if this process is shutting down, serves
        its maximum of pipes, or its buffer budget cannot take the session's bytes.
        """
        if self._closing.is_set():
            raise CapacityExceeded("this process is shutting down", 503)
        if len(self._pipes) >= self.settings.max_pipes:
            raise CapacityExceeded(f"this process serves its maximum of {self.settings.max_pipes} pipes", 503)
        try:
            session, carried = restore_detached(snapshot, settings=self.settings, budget=self.budget,
                                                now=time.monotonic())
        except BufferOverflow as exc:
            raise CapacityExceeded(f"the proxy's buffer budget cannot take the session: {exc}", 503) from exc
        if session.closed:
            log.info("client %s: the session to adopt has ended: %s", short_id(carried.client_id),
                     session.close_reason or session.end_cause)
            return None
        key = _session_key(carried.pool, carried.client_id)
        try:
            leases = self.leases[carried.pool]
            existing = self._pipes.get(key)
            if existing is not None and not existing.ending:
                raise DuplicateClient(f"client {short_id(carried.client_id)} already has a live session")
        except BaseException:
            session.close(1011, "not adopted")  # its bytes go back to the budget
            raise
        if existing is not None:
            self._forget(existing)
        pipe = PersistentPipe(carried.client_id, carried.offer, settings=self.settings, leases=leases,
                              telemetry=self.telemetry, budget=self.budget, backend_options=self._backend_options,
                              on_ended=self.pipe_ended, supervisors=self._greenlets, session=session)
        pipe.subprotocol = carried.subprotocol
        pipe.opened_at -= carried.age_s + carried.rest_s
        self._pipes[key] = pipe
        if self.fleet is not None:
            self.fleet.directory.hold(key)
        self._per_ip[carried.offer.remote_addr] += 1
        self.counters["sessions_adopted"] += 1
        self.metrics.pipe_opened()
        pipe.start_detached()
        return pipe

    def start_pipe(self, pipe: PersistentPipe, client: Connection) -> None:
        self.counters["pipes_opened"] += 1
        self.metrics.pipe_opened()
        pipe.start(client)

    def pipe_ended(self, pipe: PersistentPipe) -> None:
        """Called by a pipe when it has torn down."""
        self._forget(pipe)
        self.metrics.pipe_closed()

    def abandon_pipe(self, pipe: PersistentPipe) -> None:
        """A pipe opened by :meth:`open_pipe` whose client will never be attached."""
        pipe.abandon()
        self._forget(pipe)

    def create_pipe(self, client_id: str, upgrade: ClientUpgrade, offer: ClientOffer | None = None, *,
                    token: str | None = None, pool: str = DEFAULT_POOL) -> None:
        """Open a pipe for a client upgrade, answer the upgrade, and hand the connection to the pipe.

        Returns once the pipe runs (it owns the client connection from then
        on). If a pipe with this id is alive, the connection resumes it
        (detached) or takes it over (attached, unless ``on_duplicate`` is
        "refuse"), in the pool it has; a new pipe leases from ``pool``. Refusals raise before the client is
        answered: :class:`DuplicateClient` (409), :class:`ResumeRefused` (403),
        :class:`BackendRejected`, :class:`NoBackendAvailable` (503).
        """
        if upgrade.server_pool is not None:
            self._server_pools.add(upgrade.server_pool)
        self._http_server = upgrade.server
        key = _session_key(pool, client_id)
        existing = self._pipes.get(key)
        if existing is not None and existing.ending:
            self._forget(existing)  # its session is over and it is tearing down: this is a new one
            existing = None
        if existing is not None:
            self._rejoin(existing, upgrade, token)
            return
        if self.handoff is not None and self._start_handoff() and self._hand_to_holder(key, upgrade):
            return
        if self.fleet is not None:
            if self._closing.is_set():
                raise CapacityExceeded("this process is shutting down", 503)
            if self.fleet.resume_here(key, client_id, upgrade, token):
                return
        offer = offer or ClientOffer(client_id=client_id, subprotocols=tuple(upgrade.subprotocols),
                                     remote_addr=upgrade.remote_addr)
        try:
            pipe = self.open_pipe(client_id, offer, pool)
        except BaseException:
            if self.fleet is not None and key not in self._pipes:
                self.fleet.directory.let_go(key)  # recorded as ours by resume_here
            raise
        try:
            client = upgrade.accept(pipe.subprotocol, max_message_size=self.settings.max_message_size_bytes,
                                    max_fragments=self.settings.max_fragments)
            self.start_pipe(pipe, client)
        except BaseException:
            if upgrade.connection is not None:
                upgrade.connection.abort()  # accepted, but the pipe never took it
            self.abandon_pipe(pipe)
            raise

    def _hand_to_holder(self, key: str, upgrade: ClientUpgrade) -> bool:
        """If another process of this host holds the session ``key``, give it the upgrade."""
        if upgrade.handed_in:
            return False  # it was sent here by its holder's peer: serve it, never send it on
        holder = self.handoff.find_holder(key)
        if holder is None:
            return False
        if not upgrade.hand_over(lambda sock, address, request: Handoff.hand_over(holder, sock, address, request)):
            return False
        log.info("client %s handed to the process holding its session (%s)", short_id(key.rpartition(" ")[2]),
                 holder)
        self.counters["handed_over"] += 1
        return True

    def _start_handoff(self) -> bool:
        """Listen for peers (from the first pipe on: before it, they have nothing to ask us)."""
        try:
            self.handoff.start()
            return True
        except OSError as exc:
            log.error("handoff: cannot listen in %s, turned off: %s", self.handoff.directory, exc)
            self.handoff = None
            return False

    def _serve_handed_in(self, sock, address, request: bytes) -> None:
        """Serve a request that another process of this host handed over, as if we had read it."""
        server = self._http_server
        if server is None or self._closing.is_set():
            sock.close()
            return
        self.counters["handed_in"] += 1
        handler = ProxyHandler(sock, address, server, rfile=prefixed_reader(request, sock))
        handler.handed_in = True
        self._greenlets.spawn(handler.handle)

    def _rejoin(self, pipe: PersistentPipe, upgrade: ClientUpgrade, token: str | None) -> None:
        """Hand a new connection to a live pipe."""
        settings = self.settings
        if pipe._evacuation is not None:  # leaving this process: the client resumes it wherever it lands
            raise CapacityExceeded("the session is moving to another proxy process", 503)
        if not pipe.running:  # its first connection waits for a backend: its outcome is not known yet
            raise DuplicateClient(f"client {short_id(pipe.client_id)} is still connecting")
        if pipe.client_attached and settings.on_duplicate == "refuse":
            raise DuplicateClient(f"client {short_id(pipe.client_id)} already has a live session")
        if settings.resume_secret and not verify(settings.resume_secret, pipe.client_id, token):
            raise ResumeRefused(f"resuming client {short_id(pipe.client_id)} needs a valid token")
        if pipe.subprotocol is not None and pipe.subprotocol not in upgrade.subprotocols:
            raise ResumeRefused(f"the session speaks {pipe.subprotocol!r}; the connection must offer it")
        client = upgrade.accept(pipe.subprotocol, max_message_size=settings.max_message_size_bytes,
                                max_fragments=settings.max_fragments)
        pipe.attach(client)

    def _forget(self, pipe: PersistentPipe) -> None:
        key = _session_key(_pool_of(pipe), pipe.client_id)
        if self._pipes.get(key) is pipe:
            del self._pipes[key]
            if self.fleet is not None:  # an evacuated session's record went with its snapshot
                (self.fleet.directory.drop if pipe.evacuated else self.fleet.directory.let_go)(key)
            address = pipe.offer.remote_addr
            self._per_ip[address] -= 1
            if self._per_ip[address] <= 0:
                del self._per_ip[address]
        for leases in self.leases.values():
            leases.stop_waiting(pipe)

    # ---- delayed calls ----
    def call_later(self, delay_s: float, fn) -> None:
        """Call ``fn()`` in ``delay_s`` seconds, in a greenlet of this manager's (as
        ``gevent.spawn_later`` would, but owned); a call not yet made when :meth:`close_all` ends
        is dropped. Metrics publish their tallies through this."""
        timer = gevent.Greenlet(fn)
        timer.link_exception(lambda g: log.error("a delayed call failed", exc_info=g.exc_info))
        self._timers.add(timer)
        timer.start_later(delay_s)

    # ---- restart: moving pipes to a successor process (see iwsproxy.io.handover) ----
    def move_all(self, send) -> dict:
        """Move every pipe to a successor with ``send`` (see :func:`iwsproxy.io.takeover.move_all`)."""
        from .takeover import move_all
        return move_all(self, list(self._pipes.values()), send, self._refused_moves)

    def pool_state(self) -> dict:
        from .takeover import pool_state
        return pool_state(self)

    def adopt_pools(self, pools: dict) -> None:
        from .takeover import adopt_pools
        adopt_pools(self, pools)

    def adopt_moved(self, state: dict, fds: list[int]) -> bool:
        """Serve a pipe moved here by a predecessor, its connections live (see
        :func:`iwsproxy.io.takeover.restore_moved`); False (logged, counted) if it cannot be
        read or does not fit here, and then the descriptors are not taken."""
        from .takeover import MoveRefused, restore_moved

        try:
            moved = restore_moved(state, fds, settings=self.settings, budget=self.budget,
                                  mask_source=self.mask_source, pools=self.leases)
        except MoveRefused as exc:
            log.warning("handover: refused a pipe: %s", exc)
            self.counters["pipes_refused"] += 1
            self.metrics.handover("pipes_refused")
            return False
        carried, leases = moved.carried, self.leases[moved.carried.pool]
        pipe = PersistentPipe(carried.client_id, carried.offer, settings=self.settings, leases=leases,
                              telemetry=self.telemetry, budget=self.budget, backend_options=self._backend_options,
                              on_ended=self.pipe_ended, supervisors=self._greenlets, session=moved.session)
        pipe.subprotocol = carried.subprotocol
        pipe.opened_at -= carried.age_s
        self._pipes[_session_key(carried.pool, carried.client_id)] = pipe
        self._per_ip[carried.offer.remote_addr] += 1
        self.metrics.pipe_opened()
        self.counters["pipes_moved_in"] += 1
        self.metrics.handover("pipes_moved_in")
        pipe.start_moved(moved.client, moved.backend, moved.lease)
        return True

    # ---- shutdown ----
    def begin_shutdown(self, code: int = 1012, reason: str = "proxy restarting") -> None:
        """Start :meth:`close_all` in its own greenlet (safe from a signal handler); once only.

        The greenlet is also put in the pool of each server that opened pipes:
        gunicorn's worker waits for its pool to empty before it exits, and pipes
        (which outlive their requests) are not in it.
        """
        if self._shutdown is None:
            log.info("shutting down: closing %d clients with %d", len(self._pipes), code)
            self._shutdown = gevent.spawn(self.close_all, code, reason)
            self._shutdown.link_exception(lambda g: log.error("shutdown failed", exc_info=g.exc_info))
            for pool in self._server_pools:
                if pool.free_count() > 0:  # never block a signal handler on a full pool
                    pool.add(self._shutdown)

    @property
    def draining(self) -> bool:
        """Shutting down: /healthz answers 503 so that balancers stop sending clients here."""
        return self._closing.is_set()

    def close_all(self, code: int = 1012, reason: str = "proxy restarting", timeout: float | None = None) -> bool:
        """Close every client with ``code``; True if all pipes ended within ``timeout``
        (default: the ``shutdown_timeout_s`` setting).

        In a fleet (a session directory in Redis) the sessions are evacuated instead (see
        :meth:`Fleet.evacuate <iwsproxy.io.evacuate.Fleet.evacuate>`): their clients get 1012 too,
        and may resume on any process. Then the greenlets the pipes and handed-in requests left
        are joined (briefly) and killed, and the delayed calls not yet made (:meth:`call_later`)
        are dropped."""
        timeout = self.settings.shutdown_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._closing.set()
        if self.handoff is not None:
            self.handoff.stop()
        self._tasks.kill(timeout=1)
        for registry in self.registries.values():
            registry.stop()
        pipes = list(self._pipes.values())
        left = pipes
        if self.fleet is not None and pipes:
            keys = {pipe: _session_key(_pool_of(pipe), pipe.client_id) for pipe in pipes}
            left = self.fleet.evacuate(pipes, keys, max(0.0, deadline - time.monotonic()) * 0.9)
        for pipe in left:
            pipe.stop(code, reason)
        done = False
        with gevent.Timeout(max(0.0, deadline - time.monotonic()), False):
            for pipe in pipes:
                pipe.wait_closed()
            done = True
        if self.fleet is not None:
            self.fleet.stop()
        current = gevent.getcurrent()
        others = [g for g in list(self._greenlets) if g is not current]
        gevent.joinall(others, timeout=1.0)
        gevent.killall([g for g in others if not g.dead], timeout=1.0)
        self._timers.kill(timeout=1.0)
        return done


def _in(pool: str) -> str:
    """`` in pool NAME`` for a log line, nothing for the default pool."""
    return "" if pool == DEFAULT_POOL else f" in pool {pool}"


def _session_key(pool: str, client_id: str) -> str:
    """A session's key in this process (and between the processes of a host): the client id in
    the default pool, ``"<prefix> <client id>"`` in a route's (a prefix holds no space)."""
    return client_id if pool == DEFAULT_POOL else f"{pool} {client_id}"


def _pool_of(pipe: PersistentPipe) -> str:
    return getattr(pipe.leases, "name", DEFAULT_POOL)
