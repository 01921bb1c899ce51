"""A PersistentPipe built in the test's own process, with no PipeManager: stand-ins for its
narrow interfaces (an empty pool of backends, real telemetry)."""

from __future__ import annotations

from iwsproxy.io.backend import ClientOffer
from iwsproxy.io.pipe import PersistentPipe
from iwsproxy.io.ports import Telemetry
from iwsproxy.settings import Settings


class NoBackends:
    """Backend leases from a pool that has none: a pipe that asks waits."""

    def __init__(self) -> None:
        self.waiting: set = set()

    def acquire_backend(self, exclude):
        return None

    def release_backend(self, backend, *, failed, cause=""):
        pass

    def backend_succeeded(self, url):
        pass

    def pool_size(self) -> int:
        return 0

    def wait_for_backend(self, pipe) -> None:
        self.waiting.add(pipe)

    def stop_waiting(self, pipe) -> None:
        self.waiting.discard(pipe)


def make_pipe(client_id: str = "in-process", **settings) -> PersistentPipe:
    """A pipe whose settings are the defaults but for ``settings`` (Settings' field names)."""
    return PersistentPipe(client_id, ClientOffer(client_id=client_id), settings=Settings(**settings),
                          leases=NoBackends(), telemetry=Telemetry())
