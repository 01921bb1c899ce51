"""The session's state tables: walked on a real Session, and shown as they are in the docs."""

from __future__ import annotations

import pathlib

import pytest

from iwsproxy.session import Session
from iwsproxy.states import CLIENT_TRANSITIONS, TRANSITIONS, ClientSide, IllegalTransition, State

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "session-states.md"

# how a session is brought into each backend state, from a new one
PATHS = {
    State.CONNECTING: [],
    State.CONNECTED: ["backend connected"],
    State.DRAINING: ["backend connected", "drain"],
    State.FAILING_OVER: ["backend connected", "backend lost"],
    State.CLOSED: ["backend connected", "end"],
}
INPUTS = ["backend connected", "backend lost", "drain", "backend drained", "end"]
CLIENT_INPUTS = ["client detached", "client attached"]


def apply(s: Session, event: str, now: float = 1.0) -> None:
    """Feed ``event`` to the session through its public inputs."""
    {
        "backend connected": lambda: s.backend_connected(now, "ws://backend"),
        "backend lost": lambda: s.backend_lost(s.generation, now, "reset"),
        "drain": lambda: s.drain(now),
        "backend drained": lambda: s.backend_drained(s.generation, now),
        "end": lambda: s.close(1000, "bye"),
        "client detached": lambda: s.client_detached(now),
        "client attached": lambda: s.client_attached_again(now),
    }[event]()


def session_in(state: State, side: ClientSide) -> Session:
    s = Session(buffer_limit_bytes=1000, now=0.0, resume_grace_s=30.0)
    if side is ClientSide.DETACHED:
        apply(s, "client detached", 0.0)
    for event in PATHS[state]:
        apply(s, event, 0.0)
    assert (s.state, s.client_side) == (state, side)
    return s


@pytest.mark.parametrize("side", list(ClientSide))
@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", INPUTS)
def test_every_backend_side_input_in_every_state_does_what_the_table_says(state, side, event):
    s = session_in(state, side)
    expected = TRANSITIONS.get((state, event), state)  # not in the table: ignored, or refused
    try:
        apply(s, event)
    except IllegalTransition:
        assert (state, event) not in TRANSITIONS
    assert s.state is expected
    assert s.client_side is side  # the backend side's inputs leave the client side alone


@pytest.mark.parametrize("side", list(ClientSide))
@pytest.mark.parametrize("state", [st for st in State if st is not State.CLOSED])
@pytest.mark.parametrize("event", CLIENT_INPUTS)
def test_every_client_side_input_does_what_the_table_says(state, side, event):
    s = session_in(state, side)
    apply(s, event)
    assert s.client_side is CLIENT_TRANSITIONS.get((side, event), side)
    assert s.state is state


def test_a_closed_session_takes_no_client_back():
    s = session_in(State.CLOSED, ClientSide.ATTACHED)
    with pytest.raises(RuntimeError):
        apply(s, "client attached")


def test_every_listed_transition_is_reachable_from_a_new_session():
    for state, event in TRANSITIONS:
        assert state in PATHS and event in INPUTS


def _tables() -> list[str]:
    rows = ["| state \\ input | " + " | ".join(INPUTS) + " |", "|---|" + "---|" * len(INPUTS)]
    for state in State:
        cells = [TRANSITIONS[(state, event)].value if (state, event) in TRANSITIONS else "" for event in INPUTS]
        rows.append(f"| **{state.value}** | " + " | ".join(cells) + " |")
    client = ["| client side \\ input | " + " | ".join(CLIENT_INPUTS) + " |", "|---|" + "---|" * len(CLIENT_INPUTS)]
    for side in ClientSide:
        cells = [CLIENT_TRANSITIONS[(side, event)].value if (side, event) in CLIENT_TRANSITIONS else ""
                 for event in CLIENT_INPUTS]
        client.append(f"| **{side.value}** | " + " | ".join(cells) + " |")
    return ["\n".join(rows), "\n".join(client)]


def test_the_docs_show_the_tables_as_they_are():
    doc = DOC.read_text(encoding="utf-8")
    for table in _tables():
        assert table in doc, "docs/session-states.md: paste\n" + table
