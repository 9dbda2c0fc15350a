"""``aioipc.listen`` and ``aioipc.connect``: connections across hosts.

multiprocessing's :class:`~multiprocessing.connection.Listener` and ``Client``, with an async face
and a hardened handshake (multiprocessing's mutual HMAC challenge, byte for byte, so that plain
multiprocessing peers interoperate). One thread per listener accepts peers and drives every
handshake in progress with ``poll()`` on non-blocking sockets, each within a deadline, at most
``max_handshakes`` at a time; the peers that pass reach ``accept()`` through the bridge's
:class:`~aioipc._bridge.Reader`. ``connect`` runs the client's side in a writer thread of its own.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import math
import multiprocessing.connection as mpc
import os
import select
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from typing import Any, NoReturn

from ._bridge import Job, Reader, Writer
from ._connection import Connection
from ._exceptions import ClosedResourceError
from ._resource import AsyncResource
from ._wire import HEADER, POLL_SLICE

__all__ = [
    "InsecureListenerWarning",
    "Listener",
    "ListenerStatistics",
    "connect",
    "listen",
]

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)

#: Where a listener listens and a client connects: ``(host, port)`` for TCP, a path (or, on
#: Linux, a name in the abstract namespace, starting with a NUL) for a Unix socket.
Address = str | tuple[str, int]

#: A handshake must finish within this many seconds (the whole of it, from the accept).
HANDSHAKE_TIMEOUT = 10.0
#: At most this many handshakes in progress per listener, by default.
MAX_HANDSHAKES = 128
#: The socket's queue of connections not accepted yet, by default: multiprocessing's own
#: Listener default is 1, too few for a burst of clients (tests/test_hostile_peers.py floods it).
DEFAULT_BACKLOG = 64

# --------------------------------------------------------------------------------------------
# Across hosts: multiprocessing's Listener and Client, with an async face
# --------------------------------------------------------------------------------------------

_logger = logging.getLogger("aioipc")

#: The handshake messages of multiprocessing's challenge (its wire format, so that plain
#: multiprocessing peers interoperate).
_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
#: The digests a peer may name, as multiprocessing allows them; ours challenge with the first.
_DIGESTS = ("sha256", "sha384", "sha3_256", "sha3_384", "md5")
#: The lengths of an unprefixed (legacy HMAC-MD5) challenge or response.
_LEGACY_LENGTHS = (16, 20)

#: An accept() failure of this kind means the process or the system is short of a resource: the
#: listener logs it, stops accepting for a while (doubling up to ACCEPT_BACKOFF_MAX) and retries.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: An accept() failure of this kind concerns one peer only (it aborted, or its network failed):
#: logged at DEBUG level and retried at once, so that no peer can slow the accepting down.
_PEER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETDOWN",
        "ENETUNREACH",
        "EPERM",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
#: Authenticated peers a listener holds for accept() calls to come. Until that many wait, its
#: thread goes on accepting peers and driving handshakes (deadlines included) even while no
#: accept() is waiting; beyond it, new peers wait in the socket's backlog.
ACCEPT_AHEAD = 16
#: Peers accepted in one go before the handshakes in progress get their turn.
_ACCEPT_BATCH = 64


class InsecureListenerWarning(UserWarning):
    """Warned when a listener takes peers without an authkey (``insecure=True``) on an address
    beyond the loopback interface: any host that reaches it may send messages, which are
    unpickled, which runs code. Silence it with :func:`warnings.filterwarnings` if the network is
    trusted."""


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")
    return value


def _needs_authkey(address: Address | None, family: str | None) -> bool:
    """True unless the address is a Unix socket in the file system (guarded by its permissions)."""
    family = family or mpc.address_type(address)  # type: ignore[attr-defined]
    if family != "AF_UNIX":
        return True
    return bool(isinstance(address, (str, bytes)) and address[:1] in ("\0", b"\0"))


def _check_authkey(
    address: Address | None, family: str | None, authkey: object, insecure: object
) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
    if authkey == b"":
        raise ValueError(
            "authkey=b'' is refused: a peer that knows the empty key authenticates, so it would "
            "let anyone in. Use a long random key, e.g. os.urandom(32)"
        )
    if not isinstance(insecure, bool):
        raise TypeError(f"insecure must be a bool, not {type(insecure).__name__} {insecure!r}")
    if authkey is None and not insecure and _needs_authkey(address, family):
        raise ValueError(
            f"an authkey is required for {address!r}: a peer's messages are unpickled, which runs "
            "code, so only authenticated peers may connect. Pass authkey=..., or insecure=True to "
            "accept any peer that can reach the address"
        )


def _beyond_loopback(address: Address) -> bool:
    """True if a bound address is reachable from other hosts: an IP address that is not loopback
    (``0.0.0.0`` included)."""
    if not isinstance(address, tuple):
        return False  # a Unix socket (a path, or the abstract namespace): this host only
    try:
        return not ipaddress.ip_address(str(address[0]).partition("%")[0]).is_loopback
    except ValueError:
        return True


# -- the handshake: multiprocessing's mutual challenge, one step at a time --


def _digest_and_mac(message: bytes) -> tuple[str, bytes]:
    """The digest a challenge or response names, and the rest; ("md5", message) for the unprefixed
    (legacy) form."""
    if len(message) in _LEGACY_LENGTHS:
        return "md5", message
    if message[:1] == b"{":
        end = message.find(b"}", 1, 2 + max(map(len, _DIGESTS)))
        name = message[1:end].decode("ascii", "replace") if end > 0 else ""
        if name in _DIGESTS:
            return name, message[end + 1 :]
    raise AuthenticationError(
        "the peer does not speak multiprocessing's handshake: a message of "
        f"{len(message)} bytes with no known digest"
    )


def _verify(authkey: bytes, challenge: bytes, response: bytes) -> bool:
    name, mac = _digest_and_mac(response)
    try:
        expected = hmac.new(authkey, challenge, name).digest()
    except ValueError:  # a digest this interpreter lacks (MD5 under FIPS)
        return False
    return hmac.compare_digest(expected, mac)


def _respond(authkey: bytes, challenge: bytes) -> bytes:
    name, _ = _digest_and_mac(challenge)
    mac = hmac.new(authkey, challenge, name).digest()
    if len(challenge) in _LEGACY_LENGTHS:
        return mac
    return b"{%s}%s" % (name.encode("ascii"), mac)


#: A handshake's steps: it yields a message to send, or None to receive one (sent back to it).
_Steps = Generator["bytes | None", bytes, None]


def _challenge_peer(authkey: bytes) -> _Steps:
    challenge = b"{%s}%s" % (_DIGESTS[0].encode("ascii"), os.urandom(40))
    yield _CHALLENGE + challenge
    response = yield None
    if not _verify(authkey, challenge, response):
        yield _FAILURE
        raise AuthenticationError("the peer's digest was wrong: it does not know the authkey")
    yield _WELCOME


def _answer_peer(authkey: bytes) -> _Steps:
    message = yield None
    if not message.startswith(_CHALLENGE):
        raise AuthenticationError("the peer does not speak multiprocessing's handshake")
    yield _respond(authkey, message[len(_CHALLENGE) :])
    if (yield None) != _WELCOME:
        raise AuthenticationError("the peer rejected our digest: it uses another authkey")


def _server_steps(authkey: bytes) -> _Steps:
    yield from _challenge_peer(authkey)
    yield from _answer_peer(authkey)


def _client_steps(authkey: bytes) -> _Steps:
    yield from _answer_peer(authkey)
    yield from _challenge_peer(authkey)


#: The largest handshake message accepted. multiprocessing's are under 100 bytes, and it refuses
#: more than 256 too; a larger announced length is refused at once, before reading any of it.
HANDSHAKE_MESSAGE_MAX = 256


class _Handshake:
    """One handshake on a non-blocking fd, driven by readiness: what it has read of the message it
    waits for and what it has still to send. Reads never go past the current message, so that
    whatever the peer sends after the handshake stays in the socket for the connection."""

    __slots__ = (
        "_error",
        "_in",
        "_out",
        "_size",
        "_steps",
        "deadline",
        "done",
        "fd",
        "peer",
        "received",
    )

    def __init__(self, fd: int, steps: _Steps, deadline: float, peer: object) -> None:
        self.fd = fd
        self.deadline = deadline
        self.peer = peer
        self.done = False
        #: Messages received so far. On the listener's side, one means the peer answered the
        #: challenge right: it knows the key (a wrong answer ends the handshake at once).
        self.received = 0
        self._steps = steps
        self._out = b""
        self._in = bytearray()
        self._size = -1  # the length of the message being read; -1: its header is being read
        self._error: BaseException | None = None
        self._advance(None)

    @property
    def events(self) -> int:
        """What to poll for."""
        return select.POLLOUT if self._out else select.POLLIN | _POLLRDHUP

    def _advance(self, message: bytes | None) -> None:
        """Run the steps until they wait for a message (queueing what they send)."""
        try:
            step = next(self._steps) if message is None else self._steps.send(message)
            while step is not None:
                self._out += HEADER.pack(len(step)) + step
                step = self._steps.send(b"")
        except StopIteration:
            self.done = True
        except Exception as exc:  # raised by run(), once what was queued is sent
            self._error = exc

    def run(self) -> bool:
        """Do the I/O that can be done now; True once the handshake succeeded and all is sent.

        Raises ``multiprocessing.AuthenticationError`` (wrong key, not multiprocessing's
        handshake, a message too large), ``ConnectionResetError`` (the peer closed) or another
        ``OSError``.
        """
        try:
            while True:
                if self._out:
                    n = os.write(self.fd, self._out)
                    self._out = self._out[n:]
                elif self._error is not None:
                    error, self._error = self._error, None
                    try:
                        raise error
                    finally:
                        del error  # no cycle: this frame, the exception, its traceback
                elif self.done:
                    return True
                else:
                    self._read()
        except BlockingIOError:
            return False

    def _read(self) -> None:
        want = (4 if self._size < 0 else self._size) - len(self._in)
        if want:
            data = os.read(self.fd, want)
            if not data:
                raise ConnectionResetError(
                    errno.ECONNRESET, "the peer closed the connection during the handshake"
                )
            self._in += data
            if len(data) < want:
                return
        if self._size < 0:
            (size,) = HEADER.unpack(self._in)
            if not 0 <= size <= HANDSHAKE_MESSAGE_MAX:
                raise AuthenticationError(
                    f"the peer announced a handshake message of {size} bytes: refused, at most "
                    f"{HANDSHAKE_MESSAGE_MAX} are allowed"
                )
            self._size = size
            self._in = bytearray()
            if size:
                return
        message = bytes(self._in)
        self._size = -1
        self._in = bytearray()
        self.received += 1
        self._advance(message)

    def abandon(self) -> None:
        """Flush what can be sent at once (a ``#FAILURE#`` the peer should see), then close."""
        if self._out:
            try:
                os.write(self.fd, self._out)
            except OSError:
                pass
        self._steps.close()
        os.close(self.fd)


# -- connecting --


async def connect(
    address: Address,
    *,
    authkey: bytes | None = None,
    family: str | None = None,
    insecure: bool = False,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Connection[Any, Any]:
    """Connect to a :func:`listen`-er (or a :class:`multiprocessing.connection.Listener`) at
    ``address``: a ``(host, port)`` tuple for TCP, a path for a Unix socket.

    With ``authkey``, both sides prove they know it (multiprocessing's challenge); the peer must use
    the same key. An authkey is required except for a Unix socket path: pass ``insecure=True`` to
    connect without one. ``authkey=b""`` is refused (``ValueError``): an empty key lets anyone in.
    ``handshake_timeout`` (seconds, finite and > 0) bounds the whole handshake.

    Raises ``multiprocessing.AuthenticationError`` if the peer refuses the key, does not know it or
    does not speak the handshake, ``ConnectionRefusedError`` if nobody listens,
    ``ConnectionResetError`` if the peer closes the connection during the handshake,
    ``TimeoutError`` if the handshake takes longer than ``handshake_timeout``.

    **Cancellation**: connecting and the handshake run in a thread of their own; if cancelled, the
    connection they make (if any) is closed.
    """
    _check_authkey(address, family, authkey, insecure)
    timeout = _check_seconds("handshake_timeout", handshake_timeout)
    writer = Writer("connect")
    try:
        conn = await writer.run(
            lambda job: _connect_blocking(job, address, family, authkey, timeout)
        )
    finally:
        writer.close()
    return Connection(conn)


def _connect_blocking(
    job: Job[mpc.Connection],
    address: Address,
    family: str | None,
    authkey: bytes | None,
    timeout: float,
) -> mpc.Connection:
    conn = mpc.Client(address, family)
    try:
        if authkey is not None:
            _client_handshake(job, conn.fileno(), address, authkey, timeout)
    except BaseException:
        conn.close()
        raise
    if not job.commit():
        conn.close()
    return conn


def _client_handshake(
    job: Job[mpc.Connection], fd: int, address: Address, authkey: bytes, timeout: float
) -> None:
    """The client's side of the challenge, within one deadline."""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    handshake = _Handshake(fd, _client_steps(authkey), deadline, address)
    poller = select.poll()
    poller.register(fd, handshake.events)
    while not handshake.run():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the handshake with {address!r} took more than {timeout} s")
        if job.abandoned:
            raise ClosedResourceError("connect() was abandoned")
        poller.modify(fd, handshake.events)
        poller.poll(math.ceil(min(left, POLL_SLICE) * 1000))
    os.set_blocking(fd, True)


# -- listening --


@dataclass(frozen=True)
class ListenerStatistics:
    """A snapshot of a :class:`Listener` (``Listener.statistics()``).

    The four counts of peers turned away do not overlap: each such peer is counted once.
    """

    #: Coroutines waiting in ``accept()``.
    waiting_acceptors: int
    #: Peers connected and not authenticated yet (at most ``max_handshakes``).
    handshakes: int
    #: Peers refused so far: a wrong key, not multiprocessing's handshake, a handshake message
    #: over ``HANDSHAKE_MESSAGE_MAX`` bytes, or the connection closed during the handshake.
    refused: int
    #: aioipc threads of this listener running (one at most: it accepts and drives every handshake).
    threads: int
    #: Peers whose handshake did not finish within ``handshake_timeout`` seconds.
    timed_out: int = 0
    #: Peers dropped to make room while ``max_handshakes`` were in progress: the oldest peer that
    #: has not answered the challenge yet, or the newcomer if every one has.
    dropped: int = 0
    #: Failures of ``accept()`` itself (descriptors or memory exhausted, a peer that aborted):
    #: logged on the ``aioipc`` logger, retried.
    accept_errors: int = 0


class _AcceptSource:
    """The reader thread's view of a listening socket: in one thread, it accepts peers and drives
    every handshake in progress with ``poll()``, on non-blocking sockets, and returns the peers
    that passed.

    Why one thread and not the event loop: a flood of peers then costs the application's loop
    nothing (the work of accepting, hashing and refusing is done elsewhere), it works the same
    under asyncio, uvloop and trio, and the thread is the one the bridge already has for
    ``accept()``. Why not a thread per handshake: hostile peers could make the process start
    threads without bound.
    """

    def __init__(
        self,
        sock: socket.socket,
        authkey: bytes | None,
        timeout: float,
        max_handshakes: int,
        address: Address,
    ) -> None:
        self._sock = sock
        self._listen_fd = sock.fileno()
        self._authkey = authkey
        self._timeout = timeout
        self._max_handshakes = max_handshakes
        self._address = address
        self._lock = threading.Lock()
        self._ready: deque[mpc.Connection] = deque()
        #: Handshakes in progress by fd, oldest first (so also by deadline).
        self._pending: dict[int, _Handshake] = {}
        self.refused = self.timed_out = self.dropped = self.accept_errors = 0
        self._closed = False
        self._poller = select.poll()
        self._poller.register(self._listen_fd, select.POLLIN)
        self._wake_fd = -1
        self._backoff = 0.0
        self._paused_until = 0.0

    @property
    def handshakes(self) -> int:
        return len(self._pending)

    def stopped(self) -> bool:
        return self._closed

    def read(
        self, max_items: int, max_bytes: int, wake_fd: int
    ) -> tuple[list[mpc.Connection], BaseException | None]:
        poller = self._poller
        if self._wake_fd != wake_fd:
            if self._wake_fd >= 0:
                poller.unregister(self._wake_fd)
            poller.register(wake_fd, select.POLLIN)
            self._wake_fd = wake_fd
        while True:
            with self._lock:
                if self._closed:
                    return [], None
                now = time.monotonic()
                self._expire(now)
                if self._ready:
                    return self._take_ready(), None
                wait = self._next_timeout(now)
            events = poller.poll(None if wait is None else math.ceil(wait * 1000))
            woken = accepting = False
            with self._lock:
                if self.stopped():  # by close(), while this thread waited
                    return [], None
                for fd, _ in events:
                    if fd == wake_fd:
                        woken = True
                    elif fd == self._listen_fd:
                        accepting = True
                    else:
                        handshake = self._pending.get(fd)
                        if handshake is not None:
                            self._step(handshake)
                if accepting:  # after the handshakes: an answer that came is read before any drop
                    try:
                        self._accept_some()
                    except OSError as exc:  # the listening socket itself failed
                        return self._take_ready(), exc
                if woken and not self._ready:
                    return [], None

    def _take_ready(self) -> list[mpc.Connection]:
        items = list(self._ready)
        self._ready.clear()
        return items

    def _next_timeout(self, now: float) -> float | None:
        """Seconds until the next deadline or the end of an accept pause (None: no limit)."""
        times = []
        if self._pending:
            times.append(next(iter(self._pending.values())).deadline)
        if self._paused_until:
            times.append(self._paused_until)
        return max(min(times) - now, 0.0) if times else None

    def _expire(self, now: float) -> None:
        """Time out the handshakes past their deadline; resume accepting after a pause."""
        pending = self._pending
        while pending:
            handshake = next(iter(pending.values()))
            if handshake.deadline > now:
                break
            self.timed_out += 1
            _logger.debug(
                "listener %r: the handshake with %r timed out", self._address, handshake.peer
            )
            self._drop(handshake)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._poller.register(self._listen_fd, select.POLLIN)

    def _accept_some(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_ERRNOS:
                    self.accept_errors += 1
                    _logger.debug("listener %r: accept() failed, retrying: %s", self._address, exc)
                    continue
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self.accept_errors += 1
                self._backoff = min(max(self._backoff * 2, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)
                _logger.warning(
                    "listener %r: accept() failed (%s); accepting again in %.2f s",
                    self._address,
                    exc,
                    self._backoff,
                )
                self._poller.unregister(self._listen_fd)
                self._paused_until = time.monotonic() + self._backoff
                return
            self._backoff = 0.0
            self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: object) -> None:
        if self._authkey is None:
            sock.setblocking(True)
            self._ready.append(mpc.Connection(sock.detach()))
            return
        if len(self._pending) >= self._max_handshakes and not self._make_room(peer):
            sock.close()
            return
        sock.setblocking(False)
        fd = sock.detach()
        handshake = _Handshake(
            fd, _server_steps(self._authkey), time.monotonic() + self._timeout, peer
        )
        self._pending[fd] = handshake
        self._poller.register(fd, handshake.events)
        self._step(handshake)

    def _make_room(self, newcomer: object) -> bool:
        """Drop the oldest handshake whose peer has not proven it knows the key; if every peer in
        progress has, the newcomer is dropped instead (False)."""
        self.dropped += 1
        for handshake in self._pending.values():
            if not handshake.received:
                _logger.debug(
                    "listener %r: %d handshakes in progress, dropping the oldest (with %r)",
                    self._address,
                    len(self._pending),
                    handshake.peer,
                )
                self._drop(handshake)
                return True
        _logger.debug("listener %r: no room for a handshake with %r", self._address, newcomer)
        return False

    def _step(self, handshake: _Handshake) -> None:
        try:
            done = handshake.run()
        except Exception as exc:  # whatever a peer's handshake raises ends that peer only
            self.refused += 1
            _logger.debug("listener %r: refused %r: %s", self._address, handshake.peer, exc)
            self._drop(handshake)
            return
        fd = handshake.fd
        if done:
            del self._pending[fd]
            self._poller.unregister(fd)
            os.set_blocking(fd, True)
            self._ready.append(mpc.Connection(fd))
        else:
            self._poller.modify(fd, handshake.events)

    def _drop(self, handshake: _Handshake) -> None:
        del self._pending[handshake.fd]
        self._poller.unregister(handshake.fd)
        handshake.abandon()

    def stop(self) -> list[mpc.Connection]:
        """Stop taking peers, end the handshakes in progress; return the peers that passed and
        were not taken."""
        with self._lock:
            self._closed = True
            for handshake in list(self._pending.values()):
                self._drop(handshake)
            return self._take_ready()


class Listener(AsyncResource):
    """Accepts connections from other processes or hosts: multiprocessing's
    :class:`~multiprocessing.connection.Listener`, with an async :meth:`accept`. Made by
    :func:`listen`.

    Peers may be :func:`aioipc.connect` or plain :func:`multiprocessing.connection.Client` callers.
    One thread accepts peers and drives their handshakes, each within ``handshake_timeout``, at most
    ``max_handshakes`` at a time: a peer that fails the challenge (it gets
    ``multiprocessing.AuthenticationError``), stalls it or floods the listener is refused without
    delaying the others, and the application's event loop does none of that work. Once
    :meth:`accept` has been called, the thread goes on accepting while no call waits, holding up
    to ``ACCEPT_AHEAD`` authenticated peers for the calls to come. See :meth:`statistics` and the
    listener security page of the documentation.
    """

    def __init__(
        self,
        address: Address | None = None,
        *,
        authkey: bytes | None = None,
        family: str | None = None,
        insecure: bool = False,
        backlog: int = DEFAULT_BACKLOG,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self._closed = True  # until it is made
        if address is None and family is None:
            address = ("127.0.0.1", 0)
        _check_authkey(address, family, authkey, insecure)
        timeout = _check_seconds("handshake_timeout", handshake_timeout)
        _check_count("max_handshakes", max_handshakes, 1)
        _check_count("backlog", backlog, 0)
        self._listener = mpc.Listener(address, family, backlog)
        self._address = self._listener.address
        if authkey is None and _beyond_loopback(self._address):
            try:
                warnings.warn(
                    f"listening on {self._address!r} without an authkey (insecure=True): any host "
                    "that reaches this address may connect, and the messages it sends are "
                    "unpickled, which runs code",
                    InsecureListenerWarning,
                    stacklevel=3,
                )
            except BaseException:  # the warning is an error here: do not leave the socket open
                self._listener.close()
                raise
        sock: socket.socket = self._listener._listener._socket  # type: ignore[attr-defined]
        sock.setblocking(False)  # ours alone: accepting never waits in accept()
        self._source = _AcceptSource(sock, authkey, timeout, max_handshakes, self._address)
        self._reader: Reader[mpc.Connection] = Reader(
            self._source, name="listener", prefetch=ACCEPT_AHEAD, read_ahead=True
        )
        self._closed = False
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"address={self.address!r}"
        return f"<aioipc.Listener {state} at {id(self):#x}>"

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Listener cannot be passed to another process; listen there instead")

    @property
    def address(self) -> Any:  # Any, not Address: the caller knows which family it listens on
        """The address peers connect to (with the port chosen by the system if 0 was given).

        It stays readable after :meth:`close`, with the address the listener had.
        """
        return self._address

    async def accept(self) -> Connection[Any, Any]:
        """Wait for the next peer that connects (and passes the challenge, with an authkey).

        Raises :class:`aioipc.ClosedResourceError` after ``close()``, also when closed while
        waiting.

        **Cancellation**: safe; a peer accepted for a cancelled call goes to the next one.
        """
        self._check_open()
        return Connection((await self._reader.take(1))[0])

    def __aiter__(self) -> AsyncIterator[Connection[Any, Any]]:
        return self

    async def __anext__(self) -> Connection[Any, Any]:
        try:
            return await self.accept()
        except ClosedResourceError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop listening (a Unix socket's file is removed). Idempotent. Waiting :meth:`accept`
        calls raise :class:`aioipc.ClosedResourceError`; handshakes in progress are ended;
        connections already accepted stay open."""
        if self._closed:
            return
        self._closed = True
        for conn in self._reader.close() + self._source.stop():
            conn.close()
        self._listener.close()

    def statistics(self) -> ListenerStatistics:
        """A snapshot of this listener: who waits, the handshakes in progress, and the peers
        turned away so far, by reason."""
        reader = self._reader.statistics()
        source = self._source
        with source._lock:
            return ListenerStatistics(
                waiting_acceptors=reader["waiting"],
                handshakes=source.handshakes,
                refused=source.refused,
                threads=reader["threads"],
                timed_out=source.timed_out,
                dropped=source.dropped,
                accept_errors=source.accept_errors,
            )


def listen(
    address: Address | None = None,
    *,
    authkey: bytes | None = None,
    family: str | None = None,
    insecure: bool = False,
    backlog: int = DEFAULT_BACKLOG,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_handshakes: int = MAX_HANDSHAKES,
) -> Listener:
    """Listen for connections at ``address``: a ``(host, port)`` tuple for TCP (port 0: any free
    port, see ``listener.address``), a path for a Unix socket. The default is TCP on the loopback
    interface, any free port.

    With ``authkey``, every peer must prove it knows the key (multiprocessing's mutual challenge).
    An authkey is required except for a Unix socket path (guarded by the file's permissions): a
    peer's messages are unpickled, which runs code. ``authkey=b""`` is refused (``ValueError``): an
    empty key lets anyone in. Pass ``insecure=True`` to accept any peer; on an address beyond the
    loopback interface that warns (:class:`aioipc.InsecureListenerWarning`).

    Each handshake must finish within ``handshake_timeout`` seconds (a finite number > 0) from the
    moment the peer is accepted; at most ``max_handshakes`` (an int >= 1) run at a time: a new
    peer beyond that makes the oldest peer that has not answered the challenge yet give way (a
    peer that answered it right is never dropped for room). ``backlog`` (an int >= 0) is
    the socket's queue of connections not accepted yet.

    Use it as ``async with aioipc.listen(...) as listener:``, then ``await listener.accept()`` or
    ``async for conn in listener``.
    """
    return Listener(
        address,
        authkey=authkey,
        family=family,
        insecure=insecure,
        backlog=backlog,
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
    )
