"""The states of a session and every transition between them, as tables.  [pure]

A session has two sides. The backend side is a :class:`State`, whose CLOSED is the end of
the session; the client side is attached or detached (it stays as it was when the session ends). :class:`~iwsproxy.session.Session` changes either only through :func:`move`,
so these tables are the whole state machine: an input not listed for a state raises
:class:`IllegalTransition` and leaves the state unchanged. ``docs/session-states.md`` shows
them (a unit test checks that it matches).
"""

from __future__ import annotations

import enum

__all__ = ["State", "ClientSide", "TRANSITIONS", "CLIENT_TRANSITIONS", "IllegalTransition", "move", "move_client"]


class State(str, enum.Enum):
    """The backend side of a session."""
    CONNECTING = "connecting"      # before its first backend
    CONNECTED = "connected"        # a backend connection carries its messages
    DRAINING = "draining"          # moving off a backend: Close sent, waiting for its reply
    FAILING_OVER = "failing_over"  # between backends: client messages are buffered
    CLOSED = "closed"              # ended, for good


class ClientSide(str, enum.Enum):
    """The client side of a session."""
    ATTACHED = "attached"  # a client connection is served
    DETACHED = "detached"  # the client vanished; held for its resume grace


class IllegalTransition(RuntimeError):
    """An input that the current state does not accept (a bug in the caller)."""


_OPEN = (State.CONNECTING, State.CONNECTED, State.DRAINING, State.FAILING_OVER)

#: The backend side: (state, input) -> next state.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CONNECTING, "backend connected"): State.CONNECTED,
    (State.FAILING_OVER, "backend connected"): State.CONNECTED,
    (State.CONNECTED, "backend lost"): State.FAILING_OVER,       # error, EOF, a Close that is not an end, no Pong
    (State.DRAINING, "backend lost"): State.FAILING_OVER,        # died before its Close reply: replay
    (State.CONNECTED, "drain"): State.DRAINING,
    (State.DRAINING, "backend drained"): State.FAILING_OVER,     # its Close reply: nothing to replay
    **{(state, "end"): State.CLOSED for state in _OPEN},          # see Session.end_cause for the causes
}

#: The client side: (side, input) -> next side.
CLIENT_TRANSITIONS: dict[tuple[ClientSide, str], ClientSide] = {
    (ClientSide.ATTACHED, "client detached"): ClientSide.DETACHED,     # vanished, resume on
    (ClientSide.DETACHED, "client attached"): ClientSide.ATTACHED,     # a resume
    (ClientSide.ATTACHED, "client attached"): ClientSide.ATTACHED,     # a takeover by a new connection
}


def move(state: State, event: str) -> State:
    """The backend side's next state after ``event``; raises :class:`IllegalTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event!r} in state {state.value}") from None


def move_client(side: ClientSide, event: str) -> ClientSide:
    """The client side's next state after ``event``; raises :class:`IllegalTransition`."""
    try:
        return CLIENT_TRANSITIONS[(side, event)]
    except KeyError:
        raise IllegalTransition(f"{event!r} with the client {side.value}") from None
