"""Sequence-numbered client streams for the failover, drain and chaos tests."""

from __future__ import annotations

import threading
import uuid

import websocket


MARKER = b"end"


class StreamingClient:
    """One client sending ``<id>:<n>`` at a steady pace and recording every echo.

    The sender paces itself on ``stop.wait(interval)`` (an Event the test sets to
    end the run); the reader runs until the socket closes.
    """

    def __init__(self, url: str, interval_s: float, stop: threading.Event):
        self.client_id = str(uuid.uuid4())
        self.ws = websocket.create_connection(f"{url}/{self.client_id}", timeout=30, suppress_origin=True)
        self.interval_s = interval_s
        self.stop = stop
        self.sent = 0
        self.received: list[int] = []
        self.error: BaseException | None = None
        self.closed_with: int | None = None
        self.closing = False
        self._marker_seen = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)

    def start(self) -> "StreamingClient":
        self._reader.start()
        self._sender.start()
        return self

    def _send_loop(self) -> None:
        try:
            while not self.stop.wait(self.interval_s):
                self.ws.send(str(self.sent))
                self.sent += 1
        except BaseException as exc:  # reported by the test
            self.error = self.error or exc

    def _read_loop(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    if not self.closing:
                        self.closed_with = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    return
                if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    if data == MARKER:
                        self._marker_seen.set()
                    else:
                        self.received.append(int(data))
        except BaseException as exc:
            if not self.closing:
                self.error = self.error or exc
        finally:
            self._marker_seen.set()

    def finish(self, timeout: float = 30.0) -> None:
        """After ``stop`` is set: send a marker and wait for its echo.

        Order is preserved, so once the marker is back every surviving echo is in.
        """
        self._sender.join(timeout)
        self.ws.send(MARKER)
        if not self._marker_seen.wait(timeout):
            self.error = self.error or TimeoutError("the end marker was not echoed")

    def close(self) -> None:
        self.closing = True
        try:
            self.ws.close(timeout=2)
        except (OSError, websocket.WebSocketException):
            pass
        self._reader.join(5)

    # ---- results ----
    def distinct(self) -> int:
        return len(set(self.received))

    def first_deliveries(self) -> list[int]:
        seen: set[int] = set()
        order = []
        for n in self.received:
            if n not in seen:
                seen.add(n)
                order.append(n)
        return order

    def lost(self) -> int:
        return self.sent - len(set(self.received) & set(range(self.sent)))

    def duplicates(self) -> int:
        return len(self.received) - self.distinct()
