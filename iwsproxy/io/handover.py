"""Restarting without a disconnect: a successor process takes the listening socket and every pipe.

On SIGHUP the serving process (the *predecessor*) starts a *successor*: the same command line
and environment (so newly installed code and changed settings take effect), given two inherited
descriptors named in its environment: the listening socket (:data:`ENV_LISTENER`) and one end of
a private Unix socket pair, the *channel* (:data:`ENV_CHANNEL`). Nobody else can connect to a
socket pair; each end still checks that its peer runs as the same user and is the process it
expects (``SO_PEERCRED``).

The successor listens on the inherited socket and says ``ready``. The predecessor then stops
accepting (connections wait in the shared backlog: none is refused) and moves its pipes one by
one (:meth:`~iwsproxy.io.moving.Movable.move`), each a ``pipe`` message with its descriptors;
the successor answers each with one byte, ``1`` (taken) or ``0`` (refused: a state it cannot
read, a version it does not know). It answers *before* it reads from the pipe's sockets, so a
pipe not answered was not touched and stays with the predecessor if the successor dies. When
the predecessor holds nothing more it sends ``done`` and exits; pipes the successor refused are
closed with 1012 first (their clients reconnect, to the successor).

Wire format, each way: messages of a 4-byte length, a JSON header, then the header's ``blobs``
(byte strings, back to back). Bytes inside the header are written as ``{"$blob": index}``.
Descriptors ride on a message's first bytes; its header says how many (``fds``), and they are
taken in the order they came. ``{"op": "ready", "protocol": n, "pid": p}`` from the successor;
``{"op": "pools", "pools": {name: [[url, draining], ...]}}`` (the backends, as changed through
the admin API), then ``{"op": "pipe", "protocol": n, "state": ...}`` for each pipe and
``{"op": "done"}`` from the predecessor.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from collections import deque

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore

__all__ = ["PROTOCOL", "ENV_CHANNEL", "ENV_LISTENER", "Channel", "Recipient", "Successor", "Predecessor", "peer_credentials",
           "inherited_listener", "HandoverError"]

log = logging.getLogger(__name__)

PROTOCOL = 1
ENV_CHANNEL = "IWSPROXY_HANDOVER_FD"
ENV_LISTENER = "IWSPROXY_LISTEN_FD"
READY_TIMEOUT_S = 30.0   # a successor that has not said ready by then has failed
EXIT_WAIT_S = 1.0        # how long a failure waits for the successor's exit status (for the log)
MAX_MESSAGE_BYTES = 1 << 31
_LENGTH = struct.Struct("!I")
_CRED = struct.Struct("3i")  # pid, uid, gid
_MAX_FDS = 16


class HandoverError(Exception):
    """Internal to the I/O layer: the channel failed, or a peer said something it should not."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The ``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def check_peer(sock: socket.socket, pid: int | None) -> None:
    """Raise :class:`HandoverError` unless the peer runs as our user (and is ``pid``, if given)."""
    peer_pid, uid, _gid = peer_credentials(sock)
    if uid != os.getuid() or (pid is not None and peer_pid != pid):
        raise HandoverError(f"peer pid {peer_pid} uid {uid} is not the expected process "
                            f"(pid {pid}, uid {os.getuid()})")


def _encode(value, blobs: list):
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(value)
        return {"$blob": len(blobs) - 1}
    if isinstance(value, dict):
        return {key: _encode(item, blobs) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(item, blobs) for item in value]
    return value


def _decode(value, blobs: list):
    if isinstance(value, dict):
        if len(value) == 1 and "$blob" in value:
            return blobs[value["$blob"]]
        return {key: _decode(item, blobs) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, blobs) for item in value]
    return value


class Channel:
    """One end of the channel: messages with descriptors, both ways (see the module docstring)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._write = Semaphore()

    def send(self, header: dict, fds: list[int] = ()) -> None:
        blobs: list = []
        header = _encode(header, blobs)
        header["blobs"] = [len(b) for b in blobs]
        header["fds"] = len(fds)
        head = json.dumps(header, separators=(",", ":")).encode()
        data = b"".join([_LENGTH.pack(len(head)), head, *[bytes(b) for b in blobs]])
        with self._write:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                if sent < len(data):
                    self.sock.sendall(memoryview(data)[sent:])
            else:
                self.sock.sendall(data)

    def send_byte(self, byte: bytes) -> None:
        with self._write:
            self.sock.sendall(byte)

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            data, ancillary, _flags, _addr = self.sock.recvmsg(256 * 1024, socket.CMSG_SPACE(_MAX_FDS * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise HandoverError("the channel closed")
            self._buffer += data

    def receive(self) -> tuple[dict, list[int]]:
        """The next message's header (bytes restored) and its descriptors (ours to close)."""
        self._fill(_LENGTH.size)
        (size,) = _LENGTH.unpack_from(self._buffer)
        self._fill(_LENGTH.size + size)
        header = json.loads(bytes(self._buffer[_LENGTH.size:_LENGTH.size + size]))
        del self._buffer[:_LENGTH.size + size]
        if not isinstance(header, dict):
            raise HandoverError("a message that is not an object")
        lengths = header.pop("blobs", [])
        total = sum(lengths)
        if total > MAX_MESSAGE_BYTES:
            raise HandoverError("message too large")
        self._fill(total)
        blobs, offset = [], 0
        for length in lengths:
            blobs.append(bytes(self._buffer[offset:offset + length]))
            offset += length
        del self._buffer[:total]
        count = int(header.pop("fds", 0))
        if count > len(self._fds):
            raise HandoverError("descriptors missing")
        fds = [self._fds.popleft() for _ in range(count)]
        return _decode(header, blobs), fds

    def receive_byte(self) -> bytes:
        self._fill(1)
        byte = bytes(self._buffer[:1])
        del self._buffer[:1]
        return byte

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()


class Recipient:
    """The giving end of a channel: the process (a successor, or a live gunicorn worker) that
    takes this one's pipes, as seen from here."""

    def __init__(self, sock: socket.socket, name: str):
        self.channel = Channel(sock)
        self.name = name
        self._answers: deque[AsyncResult] = deque()
        self._reader: gevent.Greenlet | None = None
        self.alive = True
        self.error = ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait for the recipient to say ready; False (``error`` says why) if it does not in time."""
        try:
            check_peer(self.channel.sock, self._expected_pid())
            with gevent.Timeout(timeout, HandoverError(f"not ready within {timeout:g} s")):
                header, fds = self.channel.receive()
            for fd in fds:
                os.close(fd)
            if header.get("op") != "ready" or header.get("protocol") != PROTOCOL:
                raise HandoverError(f"unexpected greeting {header!r:.100}")
        except (HandoverError, OSError, ValueError) as exc:
            self._failed(str(exc) or type(exc).__name__)
            return False
        self._reader = gevent.spawn(self._read_answers)
        return True

    def _expected_pid(self) -> int | None:
        return None

    def _failed(self, why: str) -> None:
        self.alive = False
        self.error = why

    def _read_answers(self) -> None:
        try:
            while True:
                byte = self.channel.receive_byte()
                if not self._answers:
                    raise HandoverError("an answer nobody asked for")
                self._answers.popleft().set(byte == b"1")
        except (HandoverError, OSError) as exc:
            self._failed(f"{self.name} went away: {exc}")
            while self._answers:
                self._answers.popleft().set(None)

    def send_pools(self, pools: dict) -> bool:
        """Give the backends of every pool (before the pipes, which lease them)."""
        try:
            self.channel.send({"op": "pools", "pools": pools})
            return True
        except OSError as exc:
            self._failed(f"cannot reach {self.name}: {exc}")
            return False

    def send_pipe(self, state: dict, fds: list[int]) -> bool:
        """Give one pipe's state and descriptors; True once the recipient has taken them."""
        if not self.alive:
            return False
        answer = AsyncResult()
        try:
            self._answers.append(answer)
            self.channel.send({"op": "pipe", "protocol": PROTOCOL, "state": state}, fds)
        except OSError as exc:
            self._failed(f"cannot reach {self.name}: {exc}")
            return False
        return answer.get() is True

    def finish(self) -> None:
        """Tell the recipient that nothing more comes, and close the channel."""
        try:
            self.channel.send({"op": "done"})
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill(block=False)
        self.channel.close()


class Successor(Recipient):
    """A successor process started by this one."""

    def __init__(self, listener: socket.socket):
        """Start the successor (the same command line and environment), giving it ``listener``.
        Raises OSError if it cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env[ENV_CHANNEL] = str(theirs.fileno())
        env[ENV_LISTENER] = str(listener.fileno())
        argv = [sys.executable, *sys.orig_argv[1:]]
        try:
            self.process = subprocess.Popen(argv, env=env, pass_fds=(theirs.fileno(), listener.fileno()),
                                            close_fds=True)
        finally:
            theirs.close()
        self.pid = self.process.pid
        super().__init__(ours, "the successor")

    def _expected_pid(self) -> int:
        return os.getpid()  # a socket pair carries its creator's credentials

    def _failed(self, why: str) -> None:
        try:
            code = self.process.wait(timeout=EXIT_WAIT_S)  # a closed channel: it is probably exiting
        except subprocess.TimeoutExpired:
            code = None
        super()._failed(why if code is None else f"{why} (it exited with status {code})")

    def abandon(self) -> None:
        """Stop a successor that failed: kill it (if it still runs) and reap it."""
        self.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("handover: successor %d does not exit", self.pid)


def inherited_listener() -> socket.socket | None:
    """The listening socket a predecessor gave this process, if any (its variable is removed
    from the environment, so that this process's own successor is given its own)."""
    fd = os.environ.pop(ENV_LISTENER, None)
    return None if fd is None else socket.socket(fileno=int(fd))


class Predecessor:
    """The successor's view of the process that started it: the pipes it hands over."""

    def __init__(self, sock: socket.socket, parent: bool = True):
        """``parent``: the peer must be this process's parent (a successor's check), else any
        process of this user (a gunicorn worker's peer)."""
        self.channel = Channel(sock)
        self._parent = parent

    @classmethod
    def inherited(cls) -> "Predecessor | None":
        """The channel a predecessor gave this process, if any (its variable is removed)."""
        fd = os.environ.pop(ENV_CHANNEL, None)
        return None if fd is None else cls(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(fd)))

    def serve(self, adopt, adopt_pools) -> int:
        """Say ready, then take the backends (``adopt_pools(pools)``) and pipes until ``done``:
        ``adopt(state, fds) -> bool`` builds one
        (it owns the descriptors if it returns True, else they are closed here; it must not
        read from them before it returns). Returns how many were taken."""
        taken = 0
        channel = self.channel
        try:
            check_peer(channel.sock, os.getppid() if self._parent else None)
            channel.send({"op": "ready", "protocol": PROTOCOL, "pid": os.getpid()})
            while True:
                header, fds = channel.receive()
                op = header.get("op")
                if op == "done":
                    break
                if op == "pools":
                    adopt_pools(header.get("pools", {}))
                    continue
                ok = False
                if op == "pipe" and header.get("protocol") == PROTOCOL:
                    ok = adopt(header.get("state"), fds)
                else:
                    log.warning("handover: refused a %r message of protocol %r", op, header.get("protocol"))
                if not ok:
                    for fd in fds:
                        os.close(fd)
                taken += ok
                channel.send_byte(b"1" if ok else b"0")
        except (HandoverError, OSError, ValueError) as exc:
            log.warning("handover: the channel from the predecessor failed: %s", exc)
        finally:
            channel.close()
        return taken
