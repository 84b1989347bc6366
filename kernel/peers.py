"""What a peer can do to the kernel's process, bounded: routing ids, descriptors, connections.

Three things a peer could otherwise use to abort the kernel, and what closes each:

* **Routing-id collisions.**  libzmq's ROUTER names a peer that sets no routing id
  ``00 <uint32>``, counting up from a start it draws from libc's ``rand()`` when the socket is
  created.  Nothing seeds ``rand()`` in a Python process, so the start is ``00 6b8b4567`` in every
  run.  A peer may choose any routing id, including ``00 6b8b4567 + k``; libzmq does not check
  a *generated* id against those already taken and asserts (``socket_base.cpp:2113``, SIGABRT)
  when the next anonymous peer is given one a claimant already holds.  :func:`seed_routing_ids`
  seeds ``rand()`` from ``os.urandom`` right before the ROUTER is made, so the sequence is one
  of 2**32 no peer can see (the kernel never sends a routing id to anyone).  ZMQ_ROUTER_HANDOVER
  stays off: with it on, a claimed id would *take over* the honest peer holding it.
* **Descriptor exhaustion.**  libzmq's ipc:// listener asserts on ``EMFILE`` from ``accept``.
  :func:`raise_fd_limit` lifts the soft limit to the hard one, and :class:`PeerGuard` caps the
  peer connections at ``max_peers`` (at most half the descriptors the limit leaves): a
  connection over the cap is refused clearly (a request it sends is answered ``overloaded``,
  naming the cap) and shut down after a short grace, or at once during a flood.  Refusing after
  the accept is not enough under a burst (1,100 clients connecting at once under a hard limit of
  1,024 aborted the kernel: libzmq's I/O thread accepts faster than connections can be shut
  down), so the guard also **stops accepting** at the cap (:meth:`PeerGuard.accepting`): the
  server renames its ipc:// sockets to a hidden name (connected peers stay; a new ``connect``
  finds no socket and its ZeroMQ client retries later) and renames them back once the
  connections fall to three quarters of the cap -- the other half of the room absorbs what
  libzmq had queued (its listen backlog) before the rename.  A tcp:// listener is paused by a
  socket filter that drops new handshakes (:class:`TcpListener`).
* **Oversized messages** are the server's concern (kernel.server reads frame by frame).
* **Memory kept after a flood.**  glibc raises its mmap threshold each time a large block is
  freed, so after a peer sends many 1 MiB frames later ones come from the heap and stay with the
  process (940 MB still held after 2 x 1,000 frames of 1 MiB).  :func:`bound_allocator` fixes the
  threshold (256 KiB) and the trim threshold, so large frames are mapped and unmapped each time
  and the kernel's RSS returns after the flood (measured: 220 MB kept -> 21 MB, same process).

:class:`PeerGuard` is pure (no sockets; time passed in); kernel.server applies its decisions.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource

from kernel import protocol as P

log = logging.getLogger("reca.kernel")

#: How long a connection refused over the cap may still send one request (to be answered
#: ``overloaded``) before it is shut down, seconds.
REFUSE_GRACE = 0.5
#: Refused connections allowed to wait out their grace at once; past it, refused at once.
REFUSE_MARGIN = 64


def seed_routing_ids() -> bool:
    """Seed libc's ``rand()`` from ``os.urandom`` (call right before creating a ROUTER socket):
    libzmq draws the start of its generated routing ids from it.  False if libc is unreachable
    (the sequence is then the fixed default, and a warning is logged)."""
    try:
        libc = ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))
    except (OSError, AttributeError) as exc:
        log.warning("cannot seed libzmq's routing-id sequence: %s", exc)
        return False
    return True


#: glibc ``mallopt`` parameters, and the values :func:`bound_allocator` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 1 << 20


def bound_allocator() -> bool:
    """Make blocks of ``MMAP_THRESHOLD`` and more mapped (and returned on free) always, and trim
    the heap past ``TRIM_THRESHOLD`` (module docstring).  False where libc has no ``mallopt``
    (not glibc): nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped by the kernel's ``nr_open``);
    returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft, hard


#: ``SOL_SOCKET`` options of Linux: attach / detach a classic BPF filter.
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


#: One instruction, ``ret #0``: every packet is dropped (BPF_RET | BPF_K = 0x06).
_DROP_ALL = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))
_DROP_PROG = _SockFprog(1, ctypes.cast(_DROP_ALL, ctypes.POINTER(_SockFilter)))


class TcpListener:
    """A handle on the listening socket libzmq made for a ``tcp://`` endpoint (a duplicate of
    its descriptor, found by address), to stop accepting without closing it.  libzmq has no way
    to pause a listener (``zmq_unbind`` closes every connection it accepted too), and waits out
    ``EMFILE`` on tcp by retrying the accept in a loop; so :meth:`pause` attaches a socket filter
    that drops every packet reaching the *listening* socket: new connections' SYNs go unanswered
    (their ZeroMQ clients retry with backoff) while the connections accepted before (sockets of
    their own, made before the filter) carry on.  :meth:`resume` detaches it.  Linux only:
    :meth:`find` returns None elsewhere (the listener is then left as it is, as before)."""

    def __init__(self, fd: int, address: tuple[str, int]) -> None:
        self.fd = fd
        self.address = address
        self.paused = False

    @classmethod
    def find(cls, endpoint: str) -> "TcpListener | None":
        """The listener of the bound ``endpoint`` (``tcp://host:port`` as ``LAST_ENDPOINT``
        writes it), or None (not tcp, not found, not Linux)."""
        import socket

        if not endpoint.startswith("tcp://"):
            return None
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        try:
            names = os.listdir("/proc/self/fd")
            want = (str(socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)[0][4][0]), int(port))
        except (OSError, ValueError, IndexError):
            return None
        for name in names:
            try:
                fd = os.dup(int(name))
            except (OSError, ValueError):
                continue
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            try:
                if s.type == socket.SOCK_STREAM and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) \
                        and tuple(s.getsockname()[:2]) == want:
                    return cls(s.detach(), want)
            except OSError:
                pass
            s.close()
        return None

    def _set(self, option: int, value: bytes) -> None:
        import socket

        s = socket.socket(fileno=os.dup(self.fd))
        try:
            s.setsockopt(socket.SOL_SOCKET, option, value)
        finally:
            s.close()

    def pause(self) -> None:
        """Stop accepting: every new connection's handshake is dropped."""
        if not self.paused:
            self._set(_SO_ATTACH_FILTER, bytes(_DROP_PROG))
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._set(_SO_DETACH_FILTER, b"\0\0\0\0")
            self.paused = False

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def open_fds() -> int:
    """Descriptors this process has open (Linux /proc; 0 where unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class PeerGuard:
    """Counts peer connections (by descriptor, from the sockets' monitor events) and refuses those
    over the cap.  ``fd_limit``: the soft descriptor limit.  libzmq gives no way to stop accepting
    without closing every connection accepted on that endpoint (``zmq_unbind`` does), so refusal
    is by shutting refused connections down: after a grace in which a request they send is
    answered ``overloaded``, or at once while more than ``REFUSE_MARGIN`` wait in their grace or
    the process's descriptors are within ``reserve`` of the limit."""

    def __init__(self, max_peers: int = P.MAX_PEERS, fd_limit: int = 1 << 20, reserve: int = P.FD_RESERVE,
                 baseline: int = 0) -> None:
        room = max(2, fd_limit - reserve - baseline)
        #: The cap in force: the configured one, or half the room the descriptor limit leaves
        #: (the other half absorbs connections accepted before they are refused).
        self.cap = max(1, min(max_peers, room // 2))
        self.fd_limit = fd_limit
        self.reserve = reserve
        self.conns: set[int] = set()
        #: Refused connections still inside their grace: fd -> shut-down time.
        self.refusing: dict[int, float] = {}
        #: Refused connections the kernel has shut down whose close event has not come: still
        #: counted, but a new peer's message on such a descriptor comes from a newer connection.
        self.shut: set[int] = set()
        #: The socket inode each counted descriptor held when it was counted (0: unknown).
        self.inode: dict[int, int] = {}
        #: Close events still to come for connections already forgotten (see :meth:`met`).
        self.stale: dict[int, int] = {}
        self.counters = {"peers_refused": 0, "peers_max": 0, "accept_pauses": 0, "peers_met_first": 0,
                         "accept_pauses_undone": 0}
        #: Whether new connections are being accepted (False: the listeners are out of reach).
        self.open = True

    def on_accepted(self, fd: int, now: float, fds_open: int = 0, ino: int = 0) -> bool:
        """A connection was accepted; True if it is refused (see :meth:`due`).  ``ino``: the
        socket inode the descriptor holds (0: unknown).  Idempotent: the accept event of a
        connection met by its first message (:meth:`met`) keeps the decision made then."""
        if fd in self.conns:
            if ino and not self.inode.get(fd):
                self.inode[fd] = ino
            return fd in self.refusing
        over = len(self.conns) >= self.cap
        self.conns.add(fd)
        if ino:
            self.inode[fd] = ino
        self.counters["peers_max"] = max(self.counters["peers_max"], len(self.conns))
        if not over:
            self.refusing.pop(fd, None)
            return False
        self.counters["peers_refused"] += 1
        flood = len(self.refusing) >= REFUSE_MARGIN or (fds_open and fds_open >= self.fd_limit - self.reserve)
        self.refusing[fd] = now if flood else now + REFUSE_GRACE
        return True

    def counted(self, fd: int, ino: int = 0) -> bool:
        """Whether a new peer's message on ``fd`` (holding socket inode ``ino``, 0: unknown) comes
        on a counted connection: not where the descriptor is not counted, where the kernel shut
        the counted connection down, or where the descriptor now holds another socket than the
        one counted -- in each the counted connection is gone and its close event still to come."""
        if fd not in self.conns or fd in self.shut:
            return False
        known = self.inode.get(fd, 0)
        return not (ino and known and known != ino)

    def met(self, fd: int, now: float, fds_open: int = 0, ino: int = 0) -> bool:
        """A new peer's first message came on a descriptor that is not :meth:`counted` (the accept
        events arrive on another thread and can lag): count it now, so that no peer past the cap
        is served whatever the events' delay; True if it is refused.  A connection counted on the
        descriptor before is gone: it is forgotten and its close event, still to come, ignored."""
        if fd in self.conns:
            self._forget(fd)
            self.stale[fd] = self.stale.get(fd, 0) + 1
        self.counters["peers_met_first"] += 1
        return self.on_accepted(fd, now, fds_open, ino)

    def on_closed(self, fd: int) -> None:
        n = self.stale.get(fd, 0)
        if n:  # the close of a connection already forgotten (see met): the descriptor's newer one stays
            if n == 1:
                del self.stale[fd]
            else:
                self.stale[fd] = n - 1
            return
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        self.conns.discard(fd)
        self.refusing.pop(fd, None)
        self.shut.discard(fd)
        self.inode.pop(fd, None)

    def due(self, now: float) -> list[int]:
        """Refused connections whose grace is over (to shut down now; counted until they close)."""
        gone = [fd for fd, t in self.refusing.items() if t <= now]
        for fd in gone:
            del self.refusing[fd]
        self.shut.update(gone)
        return gone

    def answered(self, fd: int, now: float) -> None:
        """A refused connection got its ``overloaded`` answer: shut it down soon."""
        if fd in self.refusing:
            self.refusing[fd] = min(self.refusing[fd], now + 0.05)

    def reconcile(self, alive: set[int]) -> None:
        """Forget connections whose descriptor is no longer open (a monitor event can be lost)."""
        for fd in (self.conns | set(self.refusing)) - alive:
            self._forget(fd)
        for fd in [fd for fd in self.stale if fd not in alive]:
            del self.stale[fd]

    def accepting(self, fds_open: int = 0) -> bool | None:
        """Whether to change accepting: False (stop) when the connections reach the cap or the
        descriptors come within ``reserve`` of the limit; True (accept again) once both are well
        below (three quarters of the cap, twice the reserve); None: no change."""
        if self.open and (len(self.conns) >= self.cap or fds_open >= self.fd_limit - self.reserve):
            self.open = False
            self.counters["accept_pauses"] += 1
            return False
        if not self.open and len(self.conns) <= self.cap * 3 // 4 \
                and (not fds_open or fds_open < self.fd_limit - 2 * self.reserve):
            self.open = True
            return True
        return None

    def next_wakeup(self) -> float:
        return min(self.refusing.values(), default=float("inf"))

    def stats(self) -> dict:
        return {"peers": len(self.conns), "peer_cap": self.cap, "refusing": len(self.refusing),
                "accepting": self.open, **self.counters}
