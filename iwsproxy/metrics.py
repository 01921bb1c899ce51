"""What the proxy reports about itself: the hooks, a no-op base, and Prometheus.

The I/O layer calls the hooks of :class:`Metrics` where things happen (per
batch, never per byte); the base class records nothing. :class:`PrometheusMetrics`
turns them into ``iwsproxy_*`` metrics rendered at ``GET /metrics``.

Importing this module loads no metrics library: ``prometheus_client`` (which
pulls in socket, ssl and http.server) is imported when a
:class:`PrometheusMetrics` is made.

Several processes (gunicorn ``-w N``): when ``PROMETHEUS_MULTIPROC_DIR`` names an
empty directory in every process's environment before it starts,
``prometheus_client`` keeps each process's values in files there and every
scrape reports the sum over all processes. Gauges count live processes only;
gunicorn's ``child_exit`` hook (:mod:`iwsproxy.gunicorn_conf`) marks a dead
worker so that its gauges stop counting, while its counters are kept.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .exceptions import ConfigError

__all__ = ["Metrics", "PrometheusMetrics", "MULTIPROC_ENV", "STATES", "DIRECTIONS", "RESUME_EVENTS", "HANDOVER_EVENTS", "CLOSE_REASONS",
           "FAILOVER_BUCKETS_S", "close_reason_label", "close_code_label", "backend_label"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATES = ("connecting", "connected", "draining", "failing_over", "closed", "detached")
DIRECTIONS = ("to_backend", "to_client")
RESUME_EVENTS = ("detached", "resumed", "takeover", "expired", "overflow")
#: a restart's handover: of the process (started, completed, failed) and of its pipes (moved out, moved in, refused)
HANDOVER_EVENTS = ("started", "completed", "failed", "pipes_moved_out", "pipes_moved_in", "pipes_refused")
# a failover takes from about a millisecond (next backend up, nothing to replay) to the reconnect deadline
FAILOVER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def pipe_opened(self) -> None: ...

    def pipe_closed(self) -> None: ...

    def pipe_state(self, old: str | None, new: str | None) -> None:
        """A pipe moved from state ``old`` to ``new`` (None: not yet / no longer a pipe)."""

    def buffered_bytes(self, delta: int) -> None:
        """The bytes held for backends across pipes changed by ``delta``."""

    def failover(self, duration_s: float, replayed: int, flushed_bytes: int) -> None: ...

    def client_closed(self, code: int, cause: str | None = None) -> None:
        """The proxy closed a client with ``code``; ``cause`` is what ended the session (the
        session's ``end_cause``, or takeover, protocol), None if unknown (see :func:`close_reason_label`)."""

    def backend_error(self, url: str) -> None: ...

    def backend_ejected(self, url: str) -> None: ...

    def messages(self, direction: str, count: int, nbytes: int) -> None:
        """``count`` messages of ``nbytes`` in all went ``direction`` ("to_backend" or "to_client")."""

    def resume_event(self, kind: str) -> None:
        """A client's connection came and went while its session lived on (see ``RESUME_EVENTS``)."""

    def handover(self, event: str) -> None:
        """A restart's handover event (see ``HANDOVER_EVENTS``)."""

    def fleet_event(self, kind: str, n: int = 1) -> None:
        """``n`` sessions were evacuated, resumed from Redis, moved between processes... (see
        :data:`iwsproxy.io.evacuate.FLEET_EVENTS`)."""

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type for GET /metrics."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"


# ---- label values: a small fixed set, never free text ----
#: the ``reason`` of a client close, by the cause that ended its session (``Session.end_cause``,
#: or the pipe's own: takeover, protocol)
_REASON_BY_CAUSE = {"overflow": "overflow", "deadline": "deadline", "idle": "idle",
                    "client_unresponsive": "client_unresponsive", "backend_ended": "backend_ended",
                    "takeover": "takeover"}
#: the ``reason`` by close code, for the causes several closes share (proxy, protocol) and unknown ones
_REASON_BY_CODE = {1001: "going_away", 1002: "protocol", 1007: "protocol", 1008: "protocol", 1009: "too_big",
                   1011: "internal", 1012: "restart"}
CLOSE_REASONS = ("overflow", "deadline", "idle", "client_unresponsive", "backend_ended", "takeover", "restart",
                 "going_away", "protocol", "too_big", "internal", "other")


def close_reason_label(code: int, cause: str | None = None) -> str:
    """The ``reason`` label for a client the proxy closed with ``code``: one of :data:`CLOSE_REASONS`.

    ``cause`` is what ended the session, and where it names the reason it is the
    label, whatever the code: overflow (1013: the client's buffer or the process's
    budget is full), deadline (1013: no backend in time), idle (1001),
    client_unresponsive (1001: no Pong in time), backend_ended (the backend's 1000
    or 3000-4999 passed on), takeover (4409: a new connection took the session
    over). The causes several closes share ("proxy": a shutdown or an internal
    error; "protocol") are told apart by the code: restart (1012), going_away
    (1001), internal (1011), protocol (1002, 1007, 1008), too_big (1009), other. An
    unknown cause (None) is read from the code alone, 1000 and 3000-4999 as
    backend_ended. (``client_closed`` and ``grace_expired`` end a session with no
    client to close.)
    """
    if cause in _REASON_BY_CAUSE:
        return _REASON_BY_CAUSE[cause]
    if cause is None and (code == 1000 or 3000 <= code <= 4999):
        return "backend_ended"
    return _REASON_BY_CODE.get(code, "other")


def close_code_label(code: int) -> str:
    """The ``code`` label: registered codes as they are, application codes as ``3xxx`` / ``4xxx``."""
    if 1000 <= code <= 2999:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def backend_label(url: str) -> str:
    """A backend URL without user info, query or fragment: /metrics is not authenticated."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "invalid"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"


class PrometheusMetrics(Metrics):
    """The hooks as ``prometheus_client`` metrics in a registry of their own.

    ``registry`` defaults to a new one (never the global default, so that two
    apps in one process do not collide). With ``PROMETHEUS_MULTIPROC_DIR`` set,
    :meth:`render` reads every process's values from that directory instead.

    The hooks on the hot path (:meth:`messages`, :meth:`buffered_bytes`,
    :meth:`pipe_state`) use label children bound once, here.

    ``call_later(delay_s, fn)`` (e.g. :meth:`PipeManager.call_later
    <iwsproxy.io.manager.PipeManager.call_later>`), if given (here or, before
    the first message, as the ``call_later`` attribute), lets :meth:`messages`,
    the hook called for every write batch, tally in plain integers and publish
    to its counters (a lock and, in multiprocess mode, a file write each) at
    most ``MESSAGES_PUBLISH_S`` later; a scrape of this process and every
    closed pipe publish at once.
    """

    MESSAGES_PUBLISH_S = 1.0

    def __init__(self, registry=None, *, call_later=None):
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir is not None and not os.path.isdir(self.multiprocess_dir):
            raise ConfigError(MULTIPROC_ENV, self.multiprocess_dir, "environment",
                              "not a directory (it must exist, empty, before the processes start)")
        from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                                       generate_latest)

        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()):
            return Gauge(name, doc, labels, registry=r, multiprocess_mode="livesum")

        self._pipes_active = gauge("iwsproxy_pipes_active", "Client pipes being served.")
        by_state = gauge("iwsproxy_pipes_by_state", "Client pipes by session state.", ("state",))
        self._pipes_opened = Counter("iwsproxy_pipes_opened", "Client pipes opened.", registry=r)
        self._failovers = Counter("iwsproxy_failovers", "Completed moves of a pipe to another backend.", registry=r)
        self._failover_duration = Histogram(
            "iwsproxy_failover_duration_seconds", "From losing a backend to being connected to the next one.",
            buckets=FAILOVER_BUCKETS_S, registry=r)
        self._replayed = Counter("iwsproxy_replayed_messages",
                                 "Messages re-sent after a backend loss (possible duplicates).", registry=r)
        self._flushed = Counter("iwsproxy_flushed_bytes", "Buffered bytes sent to a new backend.", registry=r)
        self._buffered = gauge("iwsproxy_buffered_bytes", "Bytes held for backends across pipes.")
        self._clients_closed = Counter("iwsproxy_clients_closed", "Clients closed by the proxy.",
                                       ("code", "reason"), registry=r)
        self._backend_errors = Counter("iwsproxy_backend_errors", "Failed backend connections and lost ones.",
                                       ("backend",), registry=r)
        self._backend_ejections = Counter("iwsproxy_backend_ejections", "Backends ejected after failures.",
                                          ("backend",), registry=r)
        messages = Counter("iwsproxy_messages", "Messages forwarded.", ("direction",), registry=r)
        nbytes = Counter("iwsproxy_bytes", "Payload bytes forwarded.", ("direction",), registry=r)
        resume = Counter("iwsproxy_client_resume_events", "Client connections lost, resumed, taken over, "
                         "or given up on while their session lived on.", ("event",), registry=r)

        handover = Counter("iwsproxy_handover_events", "Restarts handing the listening socket and the pipes "
                           "to a successor process, and the pipes they moved.", ("event",), registry=r)
        self._handover = {event: handover.labels(event) for event in HANDOVER_EVENTS}
        self._fleet = Counter("iwsproxy_fleet_events", "Sessions evacuated to Redis, resumed from it, moved "
                              "between processes, or lost on the way.", ("event",), registry=r)
        self._by_state = {state: by_state.labels(state) for state in STATES}
        self._by_state_family = by_state
        self._by_direction = {d: (messages.labels(d).inc, nbytes.labels(d).inc) for d in DIRECTIONS}
        self.call_later = call_later
        self._tally = {d: [0, 0] for d in DIRECTIONS}  # messages and bytes not yet published
        self._publish_due = False
        self._by_backend: dict[str, tuple] = {}
        self._resume = {kind: resume.labels(kind) for kind in RESUME_EVENTS + ("other",)}
        self._generate, self._content_type = generate_latest, CONTENT_TYPE_LATEST

        if self.multiprocess_dir is None:
            self._scrape_registry = r
        else:
            from prometheus_client import multiprocess

            self._scrape_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._scrape_registry, path=self.multiprocess_dir)

    # ---- hooks ----
    def pipe_opened(self) -> None:
        self._pipes_opened.inc()
        self._pipes_active.inc()

    def pipe_closed(self) -> None:
        self._pipes_active.dec()
        self._publish_messages()

    def pipe_state(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self._state_child(old).dec()
        if new is not None:
            self._state_child(new).inc()

    def _state_child(self, state: str):
        child = self._by_state.get(state)
        if child is None:  # a state added to the session later: still a fixed, code-defined set
            child = self._by_state[state] = self._by_state_family.labels(state)
        return child

    def buffered_bytes(self, delta: int) -> None:
        self._buffered.inc(delta)

    def failover(self, duration_s: float, replayed: int, flushed_bytes: int) -> None:
        self._failovers.inc()
        self._failover_duration.observe(duration_s)
        if replayed:
            self._replayed.inc(replayed)
        if flushed_bytes:
            self._flushed.inc(flushed_bytes)

    def client_closed(self, code: int, cause: str | None = None) -> None:
        self._clients_closed.labels(close_code_label(code), close_reason_label(code, cause)).inc()

    def backend_error(self, url: str) -> None:
        self._backend_children(url)[0].inc()

    def backend_ejected(self, url: str) -> None:
        self._backend_children(url)[1].inc()

    def _backend_children(self, url: str) -> tuple:
        children = self._by_backend.get(url)
        if children is None:
            label = backend_label(url)
            children = self._by_backend[url] = (self._backend_errors.labels(label),
                                                 self._backend_ejections.labels(label))
        return children

    def messages(self, direction: str, count: int, nbytes: int) -> None:
        if self.call_later is None:
            inc_messages, inc_bytes = self._by_direction[direction]
            inc_messages(count)
            inc_bytes(nbytes)
            return
        tally = self._tally[direction]
        tally[0] += count
        tally[1] += nbytes
        if not self._publish_due:
            self._publish_due = True
            self.call_later(self.MESSAGES_PUBLISH_S, self._publish_due_messages)

    def _publish_due_messages(self) -> None:
        self._publish_due = False
        self._publish_messages()

    def _publish_messages(self) -> None:
        for direction, tally in self._tally.items():
            if tally[0]:
                inc_messages, inc_bytes = self._by_direction[direction]
                inc_messages(tally[0])
                inc_bytes(tally[1])
                tally[0] = tally[1] = 0

    def resume_event(self, kind: str) -> None:
        resume = self._resume
        resume.get(kind, resume["other"]).inc()

    def handover(self, event: str) -> None:
        self._handover[event].inc()

    def fleet_event(self, kind: str, n: int = 1) -> None:
        self._fleet.labels(kind).inc(n)

    def render(self) -> tuple[bytes, str]:
        self._publish_messages()
        return self._generate(self._scrape_registry), self._content_type
