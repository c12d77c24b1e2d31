"""A TCP proxy on 127.0.0.1 that breaks connections the ways networks do.

Between a client and a real server, ``ChaosProxy`` forwards bytes both ways
and, on demand or at random points, cuts a connection in one of two ways:

``reset``
    ``SO_LINGER`` 0 then close on both sides: the client and the server each
    get a TCP RST (what a NAT box or a dying middlebox sends).
``blackhole``
    stop forwarding in both directions and keep both sockets open: no FIN, no
    RST, the bytes just stop (a phone that changed network).  The client only
    learns of it from its own read timeout; the server's worker stays blocked
    reading until something preempts it.

Each connection is served by two pump threads on sockets with a short
timeout; a cut only sets the connection's state, and the pumps themselves
notice it within ``TICK`` seconds and the last one out closes the sockets, so
no descriptor is ever closed under a thread still using it.  Black-holed
sockets stay open until ``stop()``.

Random cuts: with ``cut_probability`` p, a new connection is given a budget
of ``cut_after`` = (lo, hi) bytes client-to-server, after which it is cut in
one of ``modes`` (picked by a seeded RNG); after ``max_cuts`` cuts (if
given) no more random ones.  ``cuts`` records every cut as (monotonic time,
mode).  The policy attributes may be changed while the proxy runs; they
apply to connections accepted afterwards.  ``arm`` gives one open
connection a budget now: it is cut after its next few bytes (inside a request
body, where a cut by bytes lands, not between requests).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

TICK = 0.1  # seconds: how soon a pump notices a cut or stop()
OPEN, RESET, BLACKHOLE = "open", "reset", "blackhole"
MODES = (RESET, BLACKHOLE)


@dataclasses.dataclass(eq=False)
class _Connection:
    client: socket.socket
    upstream: socket.socket
    budget: int | None  # client-to-server bytes left before a random cut; None: never
    mode: str  # the cut to make when the budget runs out
    state: str = OPEN
    pumps_left: int = 2
    bytes_up: int = 0
    armed: bool = False  # its budget was set by arm()
    peer_port: int = 0  # the client's port: how a client learns its connection was cut here (was_cut)


class ChaosProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target>, cutting connections by RST or black hole."""

    def __init__(self, target: int, *, cut_probability: float = 0.0, cut_after: tuple[int, int] = (0, 0),
                 modes: Sequence[str] = MODES, max_cuts: int | None = None, seed: int = 0) -> None:
        if not 0.0 <= cut_probability <= 1.0:
            raise ValueError(f"cut_probability must be within [0, 1], not {cut_probability!r}")
        if any(mode not in MODES for mode in modes) or not modes:
            raise ValueError(f"modes must be among {MODES}, not {modes!r}")
        self.target = target
        self.cut_probability = cut_probability
        self.cut_after = cut_after
        self.modes = tuple(modes)
        self.max_cuts = max_cuts
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._parked: list[socket.socket] = []  # black-holed sockets, closed by stop()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TICK)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.bytes_up = 0  # client-to-server bytes forwarded, over all connections
        self.cuts: list[tuple[float, str]] = []
        self.cut_ports: set[int] = set()  # client ports of the connections cut (ask before closing the socket)
        self._acceptor = threading.Thread(target=self._accept, name="chaos-proxy-accept", daemon=True)

    # -- control ---------------------------------------------------------------

    def start(self) -> ChaosProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection (black holes included) and wait for the pumps."""
        self._stopping.set()
        self._acceptor.join(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if not self._connections:
                    break
            time.sleep(TICK)
        with self._lock:
            parked, self._parked = self._parked, []
        for sock in parked:
            sock.close()
        self._listener.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut_all(self, mode: str) -> int:
        """Cut every open connection now by ``mode``; returns how many were cut."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        with self._lock:
            victims = [conn for conn in self._connections if conn.state == OPEN]
            for conn in victims:
                self._cut(conn, mode)
        return len(victims)

    def arm(self, mode: str, after: int, *, min_bytes: int = 0) -> bool:
        """Unless a connection armed earlier is still open: have one open connection that has carried ``min_bytes``
        client-to-server cut by ``mode`` once it carries ``after`` more.  Whether one is armed now."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        with self._lock:
            if any(conn.armed and conn.state == OPEN for conn in self._connections):
                return True
            for conn in self._connections:
                if conn.state == OPEN and conn.bytes_up >= min_bytes:
                    conn.budget, conn.mode, conn.armed = after, mode, True
                    return True
        return False

    def was_cut(self, port: int) -> bool:
        """Whether the connection from the client's ``port`` was cut here (not broken by the server)."""
        with self._lock:
            return port in self.cut_ports

    def counts(self) -> collections.Counter[str]:
        """How many cuts of each mode so far."""
        with self._lock:
            return collections.Counter(mode for _, mode in self.cuts)

    # -- machinery ---------------------------------------------------------------

    def _cut(self, conn: _Connection, mode: str) -> None:
        """Mark ``conn`` cut (lock held); its pumps act on it within TICK."""
        conn.state = mode
        self.cuts.append((time.monotonic(), mode))
        self.cut_ports.add(conn.peer_port)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(TICK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.cut_ports.discard(peer[1])  # a new connection on a port once cut: not cut (yet)
                budget = None
                if self._rng.random() < self.cut_probability:
                    budget = self._rng.randint(*self.cut_after)
                conn = _Connection(client, upstream, budget, self._rng.choice(self.modes), peer_port=peer[1])
                self._connections.add(conn)
                self.connections += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(conn, src, dst, up), daemon=True,
                                 name="chaos-proxy-pump").start()

    def _pump(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while conn.state == OPEN and not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    break
                cut_here = False
                if up:
                    with self._lock:
                        if self.max_cuts is not None and len(self.cuts) >= self.max_cuts:
                            conn.budget = None
                        if conn.budget is not None and len(data) >= conn.budget:
                            data, cut_here = data[: conn.budget], True
                            self._cut(conn, conn.mode)
                        elif conn.budget is not None:
                            conn.budget -= len(data)
                        conn.bytes_up += len(data)
                        self.bytes_up += len(data)
                if not self._send(conn, dst, data, flush=cut_here):
                    break
        finally:
            self._leave(conn)

    def _send(self, conn: _Connection, dst: socket.socket, data: bytes, *, flush: bool) -> bool:
        """Forward ``data``; False once the connection is cut or the proxy stops.

        ``flush``: this pump just cut the connection at its budget; the bytes
        before the cut point still go through (for at most 5 s).
        """
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view:
            if self._stopping.is_set() or (conn.state != OPEN and not (flush and time.monotonic() < deadline)):
                return False
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return conn.state == OPEN

    def _leave(self, conn: _Connection) -> None:
        """The last pump out closes (reset), parks (black hole) or closes (normal end) both sockets."""
        with self._lock:
            conn.pumps_left -= 1
            if conn.pumps_left:  # the other direction ends on its own (a cut, a close, stop())
                return
            self._connections.discard(conn)
            if conn.state == BLACKHOLE and not self._stopping.is_set():
                self._parked += [conn.client, conn.upstream]
                return
        if conn.state == RESET:
            _reset(conn.client)
            _reset(conn.upstream)
        else:
            conn.client.close()
            conn.upstream.close()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def chaos_proxy(target: int, **options: object) -> Iterator[ChaosProxy]:
    """``ChaosProxy(target, **options)`` started, and stopped afterwards."""
    proxy = ChaosProxy(target, **options)  # type: ignore[arg-type]
    with proxy:
        yield proxy
