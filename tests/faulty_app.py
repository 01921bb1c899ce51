"""An iwsproxy app with a fault to inject: ``POST /fault/<client id>`` makes that client's pipe
supervisor raise at its next turn (tests of the crash path; never used outside them)."""

from flask import Flask

from iwsproxy import IWSProxy
from iwsproxy.io.pipe import PersistentPipe

FAULTY: set[str] = set()
_next_deadline = PersistentPipe._next_deadline


def _next_deadline_or_fault(pipe: PersistentPipe) -> float:
    if pipe.client_id in FAULTY:
        raise RuntimeError("injected fault")
    return _next_deadline(pipe)


PersistentPipe._next_deadline = _next_deadline_or_fault

app = Flask(__name__)
app.config["IWSPROXY_ADMIN_TOKEN"] = "faulty-token"
IWSProxy(app)


@app.post("/fault/<client_id>")
def fault(client_id: str):
    FAULTY.add(client_id)
    return "", 204
