"""The kernel's process shell: owns the ROUTER and PUB sockets and the clock, feeds the Router.

The ROUTER socket's file descriptor is watched directly by the event loop (``add_reader``) and
drained without blocking, so a message costs one receive per frame and one Router call: no
future per message.  ZeroMQ's descriptor is edge-triggered, so every callback drains until the
socket reports no more input, and timer callbacks drain too (a send may consume the edge).

With ``server_keys`` both sockets are CURVE servers and a ZAP handler (kernel.auth) checks every
handshake; each message's principal is read from its ``User-Id`` frame property (the ZAP user
id of the connection it came on) and handed to the router with the message.  Without, every peer
is ``local`` (an ipc:// kernel whose runtime directory is private, or an insecure tcp:// one).

What a peer can make the kernel hold is bounded here (docs/limits.md): frames by ZMQ_MAXMSGSIZE
(libzmq drops the connection before allocating), messages by a total size and a frame count
checked frame by frame (frames past either bound are discarded without a copy), buffered
messages per peer by the high-water marks, connections by :class:`kernel.peers.PeerGuard`, and
the ROUTER's generated routing ids are unpredictable (:func:`kernel.peers.seed_routing_ids`).
The principal and the connection's descriptor (for the peer cap) are both read from the first
frame after the routing id, the one frame received as a zmq.Frame.

Bytes per connection are bounded by the kernel's own account (kernel.quotas.PeerBudgets): the
descriptor of a routing id is read once, from its first message (``ZMQ_SRCFD``), every client
message sent is counted against it, and what has left the process is read from the connection's
socket (TCP_INFO's bytes acknowledged plus the OS queue on tcp; the queue's fill on a unix
socket).  A peer past its budget is dropped: its requests answered ``overloaded`` (``quota``
names the budget), their workers told to cancel, the drop logged, and, after a short linger for
those answers, its connection shut down (a duplicate of the descriptor, as for the peer cap),
which makes libzmq free what it queued for it.

Bytes a tcp connection sent that libzmq holds before the kernel sees them (a multipart message
is handed over only once its last frame is in) are metered from the OS's count of bytes received
(TCP_INFO) less the wire size of the frames the kernel read (kernel.quotas.InboundMeters): the
monitor watcher thread looks at every tcp connection whenever the kernel's resident set has grown
4 MiB, and shuts one past ``peer_in_bytes`` down at once, abortively (libzmq drops the partial
message and frees the pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno as _errno
import fcntl
import logging
import os
import resource
import collections
import socket as _socket
import stat as _stat
import struct
import threading
import time
from typing import Any, Callable, Iterator, NoReturn

import zmq
from zmq.utils.monitor import recv_monitor_message

from kernel import auth, codec, errors, quotas
from kernel.aio import readable, send_frames
from kernel import protocol as P
from kernel.host import Host, SystemHost
from kernel.control import may_subscribe
from kernel.mmi import Management
from kernel.peers import PeerGuard, TcpListener, open_fds, seed_routing_ids
from kernel.policy import Admission, Order
from kernel.router import Router

log = logging.getLogger("reca.kernel")

#: Messages handled per readiness callback before yielding to timers and other callbacks.
_BATCH = P.RECV_BATCH
#: How often the key directory is checked for changes (revocations), seconds.
_RELOAD_INTERVAL = 0.25
_NOBLOCK = int(zmq.NOBLOCK)
_MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_MDPC = P.MDPC
#: How often the connections past a share of their budget are looked at, seconds.
_PEER_CHECK_INTERVAL = 0.25
#: A dropped peer's connection is shut down this long after its requests were answered (so a
#: peer that still reads gets the typed answers), seconds; its messages are discarded meanwhile.
_DROP_LINGER = 0.2
#: A dropped peer's routing id is remembered (its messages discarded) until its connection is
#: seen closed, or this long, seconds.
_DROP_FORGET = 10.0
#: SO_LINGER on, 0 s: the last close of a dropped connection resets it (struct linger).
_ABORT_LINGER = struct.pack("ii", 1, 0)
#: libzmq's context option ZMQ_ZERO_COPY_RECV (zmq_draft.h; libzmq >= 4.3 honours it in every
#: build, pyzmq does not name it).
_ZERO_COPY_RECV = 10
#: ``ioctl`` request: bytes in a socket's send queue (TIOCOUTQ; on tcp: not yet acknowledged).
_SIOCOUTQ = 0x5411
#: ``struct tcp_info``: offset of ``tcpi_bytes_acked`` (u64, Linux >= 4.1).
_TCPI_BYTES_ACKED = 120
#: ``struct tcp_info``: offset of ``tcpi_bytes_received`` (u64, Linux >= 4.1).
_TCPI_BYTES_RECEIVED = 128
#: ``ioctl`` request: bytes in a socket's receive queue (FIONREAD; not yet read by libzmq).
_SIOCINQ = 0x541B
_PAGE = os.sysconf("SC_PAGE_SIZE")


#: The principal of a CURVE message that carried no frame to read a User-Id from (none: a
#: ROUTER always delivers one); it may do nothing.
_UNKNOWN = auth.Principal("", auth.REVOKED)


class Oversized(Exception):
    """A message past the total-size or frame-count bound (its frames are already discarded)."""

    def __init__(self, identity: bytes, why: str) -> None:
        super().__init__(why)
        self.identity = identity
        self.why = why


def _libc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: free pages in every arena (libzmq's I/O thread has its own)
    handed back to the system; a no-op where there is none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim() -> None:
        fn(0)

    return trim


_MALLOC_TRIM = _libc_trim()
#: What the log line of a connection cut before its first message adds, per reason.
_CUT_WHY = {quotas.IN_TOTAL: " (every connection together past peers_in_bytes)"}


def _fd_inode(fd: int) -> int:
    """The inode of what descriptor ``fd`` holds now (a socket's tells one connection from a later
    one on the same number); 0 where it is closed."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return 0


def _source_fd(frame: zmq.Frame) -> int:
    """The descriptor of the connection ``frame`` arrived on (``ZMQ_SRCFD``), or -1 for a message
    with no source: libzmq's XPUB makes the unsubscriptions of a closed subscriber itself, without
    metadata, and reading SRCFD of such a message fails with EINVAL."""
    try:
        return int(frame.get(zmq.SRCFD))
    except zmq.ZMQError:
        return -1


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[_socket.socket]:
    """A Python socket object on libzmq's descriptor ``fd``, detached (never closed) after use."""
    sock = _socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _dup_if(fd: int, ino: int) -> _socket.socket:
    """A duplicate of the descriptor ``fd`` as a socket object (closing it leaves ``fd`` alone),
    if it is still the connection of inode ``ino``; else OSError.  Duplicated first, then checked:
    a check first could pass and the descriptor be closed and reused before the dup."""
    sock = _socket.socket(fileno=os.dup(fd))
    if os.fstat(sock.fileno()).st_ino != ino:
        sock.close()
        raise OSError(_errno.EBADF, "another connection on that descriptor")
    return sock


def _out_queue(fd: int) -> int:
    """Bytes in the send queue of the socket ``fd`` (tcp: not yet acknowledged by the peer; unix:
    not yet read by the peer)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0"))[0])


def _tcp_read(fd: int) -> int:
    """Bytes libzmq has read off the tcp connection ``fd`` so far: received by the OS
    (``tcpi_bytes_received``, cumulative) less what waits in its receive queue.  The queue is read
    first: bytes arriving in between can only make the answer larger."""
    inq = int(struct.unpack("i", fcntl.ioctl(fd, _SIOCINQ, b"\0\0\0\0"))[0])
    with _borrowed(fd) as sock:
        info = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 256)
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        raise OSError(_errno.ENOSYS, "TCP_INFO without tcpi_bytes_received")
    return int(struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]) - inq


def _tcp_left(sock: _socket.socket) -> int:
    """Bytes written to the tcp connection ``sock`` so far: acknowledged by the peer plus still in
    the OS queue (exact and cumulative: what has left the process)."""
    info = sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_INFO, 256)
    if len(info) < _TCPI_BYTES_ACKED + 8:
        raise OSError(_errno.ENOSYS, "TCP_INFO without tcpi_bytes_acked")
    return int(struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)[0]) + _out_queue(sock.fileno())


class KernelServer:
    """Binds ``endpoint`` (ROUTER, MDP/0.2) and ``control`` (PUB) and routes until stopped."""

    def __init__(
        self,
        endpoint: str,
        control: str,
        *,
        heartbeat_interval: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        unavailable_wait: float = P.UNAVAILABLE_WAIT,
        admission: Admission | None = None,
        management: Management | None = None,
        extra_stats: Callable[[], dict[str, Any]] | None = None,
        context: "zmq.Context[Any] | None" = None,
        server_keys: auth.ServerKeys | None = None,
        principals: auth.Principals | None = None,
        max_peers: int = P.MAX_PEERS,
        max_message: int = P.MAX_MESSAGE_SIZE,
        max_frame: int = P.MAX_FRAME_SIZE,
        peer_hwm: int = P.PEER_HWM,
        peer_out_bytes: int = quotas.PEER_OUT_BYTES,
        peer_in_bytes: int = quotas.PEER_IN_BYTES,
        peer_out_grace: float = quotas.PEER_OUT_GRACE_S,
        peers_out_bytes: int = quotas.PEERS_OUT_BYTES,
        peers_in_bytes: int = quotas.PEERS_IN_BYTES,
        inbound_rss_ceiling: int | None = None,
        host: Host | None = None,
    ) -> None:
        self.context = context or zmq.Context()
        # libzmq keeps a small frame as a reference into the 8 KiB read buffer it arrived in:
        # one frame per read pins 8 KiB (review of issue 24: 40-byte frames of an unfinished
        # message cost 4.5-6.5 KB each).  Copied instead (frames past the buffer are unaffected).
        # Read by each socket when it is made: set before the kernel's sockets are.
        with contextlib.suppress(zmq.ZMQError):
            self.context.set(_ZERO_COPY_RECV, 0)
        self._own_context = context is None
        self.max_message = max_message
        self.max_frames = P.MAX_FRAMES
        self.principals = principals
        self.zap = None
        if server_keys is not None:
            if principals is None:
                raise ValueError("CURVE needs the kernel's principals")
            from kernel.zap import ZapHandler

            self.zap = ZapHandler(self.context, principals)
            self.zap.start()
        seed_routing_ids()  # before the ROUTER exists: libzmq draws its id sequence's start now
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        # Under CURVE libzmq checks the size of the encrypted MESSAGE command, 33 bytes more than
        # the frame (measured: a 990-byte frame dropped the connection at a cap of 1,000).
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame + (quotas.CURVE_FRAME_OVERHEAD if server_keys is not None else 0))
        sock.setsockopt(zmq.SNDHWM, peer_hwm)
        sock.setsockopt(zmq.RCVHWM, peer_hwm)
        # XPUB with manual subscriptions: a subscription is applied only when the subscriber's
        # principal may receive that topic (kernel.control; issue 24: a service key heard every
        # principal's control traffic).
        pub = self.context.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_MANUAL, 1)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscribers only send subscriptions
        pub.setsockopt(zmq.SNDHWM, peer_hwm)
        if server_keys is not None:
            auth.curve_server(sock, server_keys, auth.ZAP_DOMAIN_ROUTER)
            auth.curve_server(pub, server_keys, auth.ZAP_DOMAIN_CONTROL)
        try:
            sock.bind(endpoint)
            pub.bind(control)
        except zmq.ZMQError:
            sock.close(0)
            pub.close(0)
            if self.zap is not None:
                self.zap.stop()
            raise
        self.sock = sock
        self.pub = pub
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.control = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        #: The tcp:// listeners, paused by a socket filter when the guard stops accepting.
        self._listeners = [lst for lst in (TcpListener.find(ep) for ep in (self.endpoint, self.control))
                           if lst is not None]
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.guard = PeerGuard(max_peers, fd_limit=soft if soft != resource.RLIM_INFINITY else 1 << 20,
                               baseline=open_fds())
        #: Per-connection byte budgets (kernel.quotas): the account of every routing id seen.
        self.peers = quotas.PeerBudgets(peer_out_bytes, peer_in_bytes, peer_out_grace, peers_out_bytes)
        #: What libzmq holds per tcp connection before the kernel sees it (kernel.quotas): looked at
        #: by the watcher thread whenever data arrives; the loop only adds to a meter's ``received``.
        self.inbound = quotas.InboundMeters(peer_in_bytes, peers_in_bytes, rss_ceiling=inbound_rss_ceiling)
        self._inbound_lock = threading.Lock()
        try:  # the kernel's own resident set, read by the watcher every tick
            self._statm: int | None = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._statm = None
        self._wire = quotas.frame_wire(server_keys is not None)
        #: Peers past their hard outbound budget at a send: dropped after the message in hand.
        self._urgent: set[bytes] = set()
        #: Dropped routing ids -> (descriptor, inode, when to shut it down, when to forget it, its
        #: inbound meter: what it still sends is read, discarded and counted there).
        self._dropping: dict[bytes, tuple[int, int, float, float, quotas.InboundMeter | None]] = {}
        #: Peers whose running requests the budget paused -> their tokens (to resume them).
        self._paused: dict[bytes, set[bytes]] = {}
        self._next_peer_check = 0.0
        #: The drops logged, per principal (the rest are counted: `peer_budgets` in mmi.stats).
        self._drop_log = quotas.RateQuota(60.0)
        self._monitors = [self._monitor(s, n) for n, s in enumerate((sock, pub))]
        #: Monitor events the watcher thread read, for the loop (deque: thread-safe append/pop).
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._events_lock = threading.Lock()
        self._since_drain = 0  # accepted minus closed among the queued events
        #: Descriptors the loop counted at a new peer's first message (_meet) before the watcher
        #: read their accept event: that event is not counted again in _since_drain.
        self._early: set[int] = set()
        self._wake_pending = False
        self._accepting = True
        self._accept_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_monitors, name="reca-accept-gate", daemon=True)
        self.router = Router(
            self._send,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            unavailable_wait=unavailable_wait,
            admission=admission,
            management=management,
            extra_stats=self._stats_with(extra_stats),
            publish=self._publish,
            host=host or SystemHost(),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._next_reconcile = 0.0
        self._stopped: asyncio.Event | None = None
        self._next_reload = 0.0

    def _stats_with(self, extra: Callable[[], dict[str, Any]] | None) -> Callable[[], dict[str, Any]]:
        def stats() -> dict[str, Any]:
            out = dict(extra()) if extra is not None else {}
            out["connections"] = self.guard.stats()
            with self._inbound_lock:
                inbound = self.inbound.stats()
            out["peer_budgets"] = {**self.peers.stats(), "dropping": len(self._dropping), "paused": len(self._paused),
                                   "inbound": inbound}
            out["auth"] = {"curve": self.zap is not None,
                           "principals": len(self.principals) if self.principals is not None else 0,
                           "zap_refused": self.zap.refused if self.zap is not None else 0}
            return out
        return stats

    def _monitor(self, sock: "zmq.Socket[Any]", n: int) -> "zmq.Socket[Any]":
        """A PAIR receiving ``sock``'s accept/disconnect events.  Its receive high-water mark is 0
        (unlimited; over inproc that makes the whole pipe unlimited): a lost DISCONNECTED event
        would leave a reused descriptor marked as refused."""
        addr = f"inproc://reca-monitor-{id(self)}-{n}"
        sock.monitor(addr, _MONITORED)
        pair = self.context.socket(zmq.PAIR)
        pair.setsockopt(zmq.RCVHWM, 0)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(addr)
        return pair

    # -- I/O --------------------------------------------------------------------------------------

    def _send(self, frames: list[Any]) -> bool | None:
        peers = self.peers
        # Only a client message counts against its peer's outbound budget (a worker's peer has an
        # account too, never looked up here: the dialect is tested first).
        if len(frames) > 2 and (frames[1] == _MDPC or frames[2] == _MDPC):
            acct = peers.accounts.get(frames[0])
        else:
            acct = None
        if acct is not None:
            if acct.sent - acct.credited >= peers.sample_at and (not acct.tcp or not peers.may_send(acct)):
                # Fresh evidence: at every send to a unix peer past the share (its evidence
                # credits what was sent before the previous look), before refusing a tcp one.
                self._sample(frames[0], acct)
                if not peers.may_send(acct):
                    # Twice its budget not yet out of the process: not handed to libzmq; the
                    # peer is dropped after the message in hand (kernel.quotas).
                    peers.counters["sends_refused"] += 1
                    self._urgent.add(frames[0])
                    return None
            size = sum(map(len, frames)) - len(frames[0])
        try:
            send_frames(self.sock, frames)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            if exc.errno == zmq.EAGAIN:
                self.router.counters["send_would_block"] += 1
                if self.router.counters["send_would_block"] == 1:  # counted in mmi.stats after
                    log.error("a peer's queue is full (it does not read); its message is dropped")
                return None
            raise
        if acct is not None:
            # PeerBudgets.sent, inlined (the client message's hot path): counted, and marked hot
            # past the sample share; then paused (or judged) past its budget, after the message
            # in hand, and every connection together checked past the total bound.
            held = acct.sent = acct.sent + size
            held -= acct.credited
            total = peers.total = peers.total + size
            if held >= peers.sample_at:
                peers.hot.add(frames[0])
            if not acct.paused and held >= peers.pause_at:
                self._urgent.add(frames[0])
            if total > peers.total_bytes:
                self._urgent.add(b"")
        return True

    def _publish(self, topic: bytes, message: dict[str, Any]) -> None:
        try:
            self.pub.send_multipart([topic, codec.pack(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops on HWM by design; count it
            self.router.counters["publish_dropped"] += 1
            log.error("control publish on %r failed: %s", topic, exc)
        # A send processes the socket's pending commands and can swallow the edge that would
        # have woken the loop for a waiting subscription: look now.
        if int(self.pub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._on_subscriptions()

    def _recv(self) -> tuple[list[bytes], auth.Principal]:
        """One message, identity first, within the size and frame bounds, and its principal;
        raises ``zmq.Again`` when there is none, :class:`Oversized` (after discarding the rest
        uncopied) past a bound, and answers a connection refused over the peer cap itself (then
        returns no frames).  Under CURVE the principal is the ``User-Id`` of the first frame after
        the routing id (role REVOKED: a key the kernel no longer knows); otherwise ``local``."""
        # Frames are received as zmq.Frame and their ``more`` flag read from the frame: pyzmq's
        # getsockopt(RCVMORE) builds an option enum per call, which cost more than the frame.
        # recv(flags, copy): copy=False, by position (measured no cheaper than the keyword; shorter).
        recv = self.sock.recv
        frame = recv(_NOBLOCK, False)  # the routing id (made by the ROUTER: carries no metadata)
        parts = [frame.bytes]
        append = parts.append
        more = frame.more
        total, srcfd = 0, -1
        refusing = self.guard.refusing
        principals = self.principals if self.zap is not None else None
        principal = auth.LOCAL_OPERATOR if principals is None else _UNKNOWN
        acct = self.peers.accounts.get(parts[0])
        meter = acct.meter if acct is not None else None
        new_peer = False
        if acct is None:
            gone = self._dropping.get(parts[0]) if self._dropping else None
            if gone is None:
                new_peer = True
            else:
                meter = gone[4]
        # The frames' bytes on the wire (kernel.quotas.frame_wire), for the inbound meter.
        cut, small, large = self._wire
        wire = 0
        max_message, max_parts = self.max_message, self.max_frames + 1
        if more and (principals is not None or refusing or new_peer):
            # The first frame after the routing id carries the connection's metadata (its source
            # descriptor, its CURVE User-Id); then the same steps and bound checks as the loop below.
            frame = recv(0, False)
            more = frame.more
            if refusing or new_peer:
                srcfd = _source_fd(frame)
                if new_peer and srcfd >= 0:
                    self._meet(srcfd)
            if principals is not None:
                name = str(frame.get(auth.USER_ID) or "")
                principal = principals.by_name(name) or auth.Principal(name, auth.REVOKED)
            data = frame.bytes
            n = len(data)
            total += n
            wire += n + (small if n < cut else large)
            append(data)
            if total > max_message or len(parts) > max_parts:
                self._oversized(parts[0], more, wire, new_peer, srcfd, principal, meter)
        # The steady state (a known peer, no CURVE, no refusal): nothing per frame but the frame.
        while more:
            frame = recv(0, False)
            more = frame.more
            data = frame.bytes
            n = len(data)
            total += n
            wire += n + (small if n < cut else large)
            append(data)
            if total > max_message or len(parts) > max_parts:
                self._oversized(parts[0], more, wire, new_peer, srcfd, principal, meter)
        if srcfd in refusing:
            self.router.counters["peer_cap_refusals"] += 1
            self.router.refuse_peer(parts, f"the kernel serves at most {self.guard.cap} concurrent peers; "
                                           "retry later")
            self.guard.answered(srcfd, time.monotonic())
            return [], principal
        if new_peer and srcfd >= 0:
            acct = self._open_peer(parts[0], srcfd, principal.name)
            meter = acct.meter if acct is not None else None
        if meter is not None:
            meter.received += wire  # the loop is its only writer (the watcher reads)
        return parts, principal

    def _oversized(self, identity: bytes, more: bool, wire: int, new_peer: bool, srcfd: int,
                   principal: auth.Principal, meter: quotas.InboundMeter | None) -> NoReturn:
        """A message past a bound (:meth:`_recv`): its remaining frames are discarded uncopied
        (and counted on the wire), then :class:`Oversized` is raised."""
        recv = self.sock.recv
        cut, small, large = self._wire
        while more:
            frame = recv(0, False)  # dropped uncopied; libzmq frees it at once
            more = frame.more
            n = len(frame)
            wire += n + (small if n < cut else large)
        self.router.counters["oversized_messages"] += 1
        if new_peer and srcfd >= 0 and srcfd not in self.guard.refusing:
            acct = self._open_peer(identity, srcfd, principal.name)
            meter = acct.meter if acct is not None else None
        if meter is not None:
            meter.received += wire
        raise Oversized(identity, f"message larger than {self.max_message} bytes or "
                                  f"{self.max_frames} frames")

    def _on_readable(self) -> None:
        if self._drain():
            self._arm()

    def _on_subscriptions(self) -> None:
        """Apply the control subscriptions peers sent, each only if the subscriber's principal
        may receive that topic (kernel.control); the rest are dropped and counted.  A message
        whose handling raises is the kernel's bug: logged and counted, and the loop goes on -- the
        socket's edge is not signalled again for what it still holds, so stopping here would leave
        every later subscription unapplied."""
        pub = self.pub
        principals = self.principals if self.zap is not None else None
        while int(pub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            try:
                msg = pub.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return
            try:
                self._subscription(msg, principals)
            except Exception:
                self.router.counters["internal_errors"] += 1
                log.exception("internal error applying a control subscription")

    def _subscription(self, msg: zmq.Frame, principals: auth.Principals | None) -> None:
        """One message read from the control socket (see :meth:`_on_subscriptions`)."""
        pub = self.pub
        data = msg.bytes
        self._credit_subscription(msg, data)
        if not data or data[0] not in (0, 1):
            return
        topic = data[1:]
        if data[0] == 0:
            pub.setsockopt(zmq.UNSUBSCRIBE, topic)
            return
        if principals is None:
            principal = auth.LOCAL_OPERATOR
        else:
            try:
                name = str(msg.get(auth.USER_ID) or "")
            except zmq.ZMQError:  # no connection behind it: nobody to grant it to
                name = ""
            principal = principals.by_name(name) or auth.Principal(name, auth.REVOKED)
        if not principal.revoked and may_subscribe(principal, topic):
            pub.setsockopt(zmq.SUBSCRIBE, topic)  # applies to the pipe it came on
        else:
            self.router.counters["subscriptions_refused"] += 1
            if self.router.counters["subscriptions_refused"] <= 10:
                log.warning("control subscription %r refused for %s (%s)", topic[:64], principal.name,
                            principal.role)

    def _credit_subscription(self, msg: zmq.Frame, data: bytes) -> None:
        """Count a frame read from the control socket against its connection's inbound meter: a
        subscription travels as a SUBSCRIBE (or CANCEL) command, 9 (6) bytes more than the message
        form, the larger is credited; any other frame at its size (kernel.quotas.subscription_wire).
        A message libzmq made itself -- the unsubscriptions of a subscriber whose connection closed --
        has no source connection and nothing was received for it: nothing is credited."""
        fd = _source_fd(msg)
        if fd < 0:
            return
        m = self.inbound.meters.get(fd)
        if m is None:
            try:
                ino = os.fstat(fd).st_ino
                with _borrowed(fd) as s:
                    unix = s.family == _socket.AF_UNIX
            except OSError:
                return
            with self._inbound_lock:
                m = self.inbound.meter(fd, ino, unix)
        m.received += quotas.subscription_wire(data, self.zap is not None)

    def _drain(self) -> bool:
        """Route what the ROUTER socket holds (at most one batch; the rest on the next turn), then
        hand the decisions taken to the operating system.  False once the socket is closed."""
        router = self.router
        on_message = router.on_message
        clock = time.monotonic
        sock = self.sock
        dropping = self._dropping
        in_bytes = self.peers.in_bytes
        recv = self._recv
        for n in range(_BATCH):
            try:
                # After the first message, look before receiving: most wake-ups carry one message,
                # and the zmq.Again that would end the drain costs ~3x the look (28k against 9.5k
                # instructions, measured); a burst goes on receiving until zmq.Again as before.
                if n == 1 and not readable(sock):
                    break
                frames, principal = recv()
            except zmq.Again:
                break
            except Oversized as exc:
                self.router.reply_bad(exc.identity, exc.why)
                continue
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ENOTSOCK:
                    return False
                raise
            if not frames:
                continue
            if dropping and frames[0] in dropping:
                self.peers.counters["discarded"] = self.peers.counters.get("discarded", 0) + 1
                continue
            try:
                on_message(frames, clock(), principal)
                if router.queued_bytes > in_bytes or self._urgent:  # else no peer can be past it
                    self._check_after_message(frames[0], clock())
            except Exception:  # a routing bug must not take the kernel down
                self.router.counters["internal_errors"] += 1
                log.exception("internal error handling a message from %r", frames[:1])
        else:
            # Batch full: more may be waiting; let timers run, then continue.
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)
        self.router.admission.flush_log()  # a kernel crash loses no decision taken so far
        return True

    # -- per-connection byte budgets (kernel.quotas.PeerBudgets) ----------------------------------

    def _open_peer(self, identity: bytes, fd: int, who: str) -> quotas.PeerAccount | None:
        """Account a routing id first seen on descriptor ``fd`` (a socket of libzmq's); a tcp one
        is linked to its connection's inbound meter (made here if the watcher has not yet)."""
        try:
            st = os.fstat(fd)
            if not _stat.S_ISSOCK(st.st_mode):
                return None
            with _borrowed(fd) as s:
                tcp = s.family in (_socket.AF_INET, _socket.AF_INET6)
                left = _tcp_left(s) if tcp else 0
                room = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF) // 2
        except OSError:
            return None
        acct = self.peers.open(identity, fd, st.st_ino, tcp, left, room, who)
        with self._inbound_lock:  # a unix one: what the kernel read, for the ceiling's evidence
            acct.meter = self.inbound.meter(fd, st.st_ino, not tcp)
        return acct

    def _sample(self, identity: bytes, acct: quotas.PeerAccount) -> bool:
        """Credit what has left the process for ``identity`` from its socket; False (and the
        account forgotten) when its connection is gone."""
        try:
            if os.fstat(acct.fd).st_ino != acct.ino:
                raise OSError(_errno.EBADF, "descriptor reused")
            if acct.tcp:
                with _borrowed(acct.fd) as s:
                    self.peers.sample_tcp(acct, _tcp_left(s))
            else:
                self.peers.sample_unix(acct, _out_queue(acct.fd) < acct.room_below)
        except OSError:
            self.peers.forget(identity)
            return False
        return True

    def _judge(self, identity: bytes, now: float) -> None:
        why = self.peers.judge(identity, self.router.held_by(identity), now)
        if why is not None:
            self._drop(identity, why, now)
            return
        acct = self.peers.accounts.get(identity)
        step = self.peers.flow(identity, acct, now) if acct is not None else None
        if step is not None:
            self._flow(identity, step, now)

    def _flow(self, identity: bytes, step: str, now: float) -> None:
        """Pause the running requests of ``identity`` (``preempt`` to their workers), or resume
        those the budget paused that are still running.  O(requests in flight), only at a step."""
        router = self.router
        if step == quotas.PAUSE:
            tokens = {r.token for r in router.inflight.values()
                      if r.client == identity and r.worker is not None and not r.done}
            self._paused.setdefault(identity, set()).update(tokens)
            op = P.ControlOp.PREEMPT
        else:
            tokens = self._paused.pop(identity, set())
            op = P.ControlOp.RESUME
        for token in tokens:
            req = router.inflight.get(token)
            if req is not None and not req.done and req.client == identity:
                router.order(Order.to_request(op, req), now)

    def _check_after_message(self, identity: bytes, now: float) -> None:
        """After a message: the sender past its inbound budget, or peers past twice their outbound
        budget at a send, are dropped now."""
        if self.router.held_by(identity) > self.peers.in_bytes:
            self._drop(identity, quotas.IN, now)
        self._check_urgent(now)

    def _check_urgent(self, now: float) -> None:
        while self._urgent:
            identity = self._urgent.pop()
            acct = self.peers.accounts.get(identity)
            if acct is not None and self._sample(identity, acct):  # fresh evidence first
                self._judge(identity, now)
        if self.peers.largest() is not None:
            # Every connection together past the bound: fresh evidence for those holding much,
            # then the ones holding the most are dropped until the total is under it.
            for identity in list(self.peers.hot):
                acct = self.peers.accounts.get(identity)
                if acct is not None:
                    self._sample(identity, acct)
            while (largest := self.peers.largest()) is not None:
                self._drop(largest, quotas.TOTAL, now)

    def _check_peers(self, now: float) -> None:
        """Each check interval: look at the connections past a share of their outbound budget
        (credit what left, drop those past it for the grace), shut down dropped ones."""
        self._check_urgent(now)
        if now >= self._next_peer_check:
            self._next_peer_check = now + _PEER_CHECK_INTERVAL
            accounts = self.peers.accounts
            for identity in list(self.peers.hot):
                acct = accounts.get(identity)
                if acct is not None and self._sample(identity, acct):
                    self._judge(identity, now)
        if self._dropping:
            self._shutdown_dropped(now)

    def _drop(self, identity: bytes, why: str, now: float, unread: int | None = None) -> None:
        """Drop the peer ``identity`` past its ``why`` budget: its requests answered, the drop
        logged, its connection shut down after :data:`_DROP_LINGER`."""
        acct = self.peers.dropped(identity, why)
        self._paused.pop(identity, None)
        held = self.router.held_by(identity)
        if unread is not None and why == quotas.IN_RSS:
            sent = (f"sent {unread} bytes the kernel had not yet seen, the most of every connection" if unread else
                    "was sending (ipc://) while nothing it sent reached the kernel")
            what = (f"{sent}, while the kernel's resident set was past its ceiling ({self.inbound.rss_ceiling} "
                    f"bytes above its baseline: inbound_rss_ceiling)")
        elif unread is not None and why == quotas.IN_TOTAL:
            what = (f"sent {unread} bytes the kernel had not yet seen, the most of every connection, which "
                    f"together passed {self.inbound.total_bytes} (peers_in_bytes)")
        elif unread is not None:
            what = (f"sent {unread} bytes the kernel had not yet seen (a message libzmq holds until its "
                    f"last frame is in), past its budget of {self.peers.in_bytes}")
        elif why == quotas.IN:
            what = f"held {held} bytes of queued requests, past its budget of {self.peers.in_bytes}"
        elif why == quotas.TOTAL:
            what = (f"did not read {acct.outstanding if acct is not None else 0} bytes of replies, the most of "
                    f"every connection, which together passed {self.peers.total_bytes}")
        else:
            out = acct.outstanding if acct is not None else 0
            what = (f"did not read {out} bytes of replies (budget {self.peers.out_bytes}: past it for "
                    f"{self.peers.grace:g} s, or twice it, or paused and reading nothing for as long)")
        exc = errors.Overloaded(f"connection dropped: it {what}", quota=why)
        n = self.router.drop_client(identity, exc, now)
        who = acct.who if acct is not None else "?"
        ok, suppressed = self._drop_log.take(who, now)
        if ok:
            log.warning("peer %s (%s) dropped: it %s; %d request(s) answered overloaded%s", identity.hex(), who,
                        what, n, f" ({suppressed} more drops not logged)" if suppressed else "")
        if acct is not None:
            self._dropping[identity] = (acct.fd, acct.ino, now + _DROP_LINGER, now + _DROP_FORGET, acct.meter)

    def _shutdown_dropped(self, now: float) -> None:
        for identity, (fd, ino, at, forget, meter) in list(self._dropping.items()):
            if now >= forget:
                del self._dropping[identity]
            elif at is not None and now >= at:
                self._dropping[identity] = (fd, ino, float("inf"), forget, meter)
                try:
                    with _dup_if(fd, ino) as s:  # as for the peer cap: libzmq sees it close
                        # An abortive close (RST, send queue discarded): a FIN would wait behind the
                        # unread bytes in a zero window (FIN-WAIT-1, the OS holding the queue).
                        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _ABORT_LINGER)
                        s.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    del self._dropping[identity]

    def _meet(self, fd: int) -> None:
        """A new peer's first message came on ``fd``: make sure its connection is counted before
        it is served.  The accept events arrive through the watcher thread and can lag (a busy
        machine): serving first and counting later let 68 peers past a cap of 40 in a flood
        (CI, stop 35).  Queued events go first (an older close of this descriptor); then a
        connection the guard does not count here (:meth:`PeerGuard.counted`: none, or one the
        kernel shut down, or another socket than the one counted) is counted now."""
        now = time.monotonic()
        fds = self._drain_monitor(now) if self._events else 0
        ino = _fd_inode(fd)
        if not ino:  # closed already: its message is answered to no one, and nothing is counted
            return
        if self.guard.counted(fd, ino):
            return
        with self._events_lock:  # its accept event, when the watcher reads it, is counted already
            self._early.add(fd)
        fds = fds or open_fds()
        self._count_refusal(self.guard.met(fd, now, fds, ino))
        change = self.guard.accepting(fds)
        if change is not None:
            self._set_accepting(change)

    def _count_refusal(self, refused: bool) -> None:
        if refused and self.guard.counters["peers_refused"] == 1:
            log.warning("a connection was refused: over the peer cap of %d (counted in the kernel stats from "
                        "now on)", self.guard.cap)

    def _peer_fd_closed(self, fd: int) -> None:
        """A connection on ``fd`` closed (monitor event): its account, or its dropped entry, goes
        -- unless the descriptor already carries a newer connection (another inode)."""
        identity = self.peers.by_fd.get(fd)
        if identity is not None:
            acct = self.peers.accounts[identity]
            try:
                alive = os.fstat(fd).st_ino == acct.ino
            except OSError:
                alive = False
            if not alive:
                self.peers.forget(identity)
                self._paused.pop(identity, None)
        for ident, (dfd, *_) in list(self._dropping.items()) if self._dropping else ():
            if dfd == fd:
                del self._dropping[ident]

    # -- connections ------------------------------------------------------------------------------

    def _on_monitor(self) -> None:
        self._wake_pending = False
        self._drain_monitor(time.monotonic())
        self._arm()

    def _watch_monitors(self) -> None:
        """The monitor sockets' reader, on a thread of its own (issue 24): it queues every
        accept/close event for the loop and stops accepting *itself* the moment the connections
        reach the peer cap -- a busy loop reacted too late under a burst, and libzmq aborts on
        EMFILE in an ipc accept.  Only this thread touches the monitor sockets once started."""
        poller = zmq.Poller()
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        tick_ms = int(quotas.INBOUND_TICK_S * 1000)
        while not self._watch_stop.is_set():
            try:
                ready = poller.poll(tick_ms)
            except zmq.ZMQError:
                return
            got = False
            for mon, _ in ready:
                while True:
                    try:
                        event = recv_monitor_message(mon, _NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        return
                    self._inbound_event(event)
                    with self._events_lock:
                        self._events.append(event)
                        fd = int(event["value"])
                        if event["event"] != zmq.EVENT_ACCEPTED:
                            self._since_drain -= 1
                        elif fd in self._early:  # counted by the loop already (_meet)
                            self._early.discard(fd)
                        else:
                            self._since_drain += 1
                    got = True
            if got:
                # The loop's count of connections plus what it has not seen yet.
                if len(self.guard.conns) + self._since_drain >= self.guard.cap and self._accepting:
                    self._set_accepting(False)
                loop = self._loop
                if loop is not None and not self._wake_pending:
                    self._wake_pending = True
                    try:
                        loop.call_soon_threadsafe(self._on_monitor)
                    except RuntimeError:  # the loop is closed: shutting down
                        return
            try:
                self._inbound_tick()
            except Exception:  # a bug here must not stop the accept gate this thread also is
                self.inbound.counters["errors"] = self.inbound.counters.get("errors", 0) + 1
                if self.inbound.counters["errors"] == 1:
                    log.exception("internal error in the inbound watcher (counted from now on)")

    # -- inbound: what libzmq holds before the kernel sees it (kernel.quotas.InboundMeters) -------

    def _inbound_event(self, event: dict[str, Any]) -> None:
        """(watcher thread) A connection accepted: a tcp one is metered; one closed: its meter goes."""
        fd = int(event["value"])
        if event["event"] != zmq.EVENT_ACCEPTED:
            # Only if the descriptor no longer holds the metered socket: by now it may carry a
            # newer connection whose first message already made its meter (the loop's).
            try:
                ino: int | None = os.fstat(fd).st_ino
            except OSError:
                ino = None
            with self._inbound_lock:
                m = self.inbound.meters.get(fd)
                if m is not None and m.ino != ino:
                    self.inbound.close(fd, m.ino)
                # What libzmq held for it (ipc:// included, unmetered) is freed: handed back.
                self.inbound.freed(time.monotonic())
            return
        try:
            st = os.fstat(fd)
            if not _stat.S_ISSOCK(st.st_mode):
                return
            with _borrowed(fd) as s:
                # unix (ipc://): no cumulative count; judged only past the ceiling (docs/limits.md)
                unix = s.family not in (_socket.AF_INET, _socket.AF_INET6)
            with self._inbound_lock:  # the family is authoritative (a meter the loop made first may guess)
                self.inbound.meter(fd, st.st_ino, unix).unix = unix
        except OSError:
            with self._inbound_lock:
                self.inbound.close(fd)

    def _rss(self) -> int:
        if self._statm is None:
            return 0
        return int(os.pread(self._statm, 128, 0).split()[1]) * _PAGE

    def _inbound_tick(self) -> None:
        """(watcher thread, every tick) When the kernel's resident set has grown by
        ``INBOUND_SCAN_STEP`` since the last look, look at every tcp connection (kernel.quotas)."""
        try:
            rss = self._rss()
        except (OSError, ValueError, IndexError):
            return
        now = time.monotonic()
        with self._inbound_lock:
            trim = self.inbound.trim_due(now)
        if trim:
            # What a cut connection held is freed by libzmq's I/O thread into its own arena, in
            # pieces glibc does not hand back by itself (4M empty frames: +200 MB kept after the cut).
            _MALLOC_TRIM()
            try:
                rss = self._rss()
            except (OSError, ValueError, IndexError):
                return
        # Memory the kernel holds by its own account, bounded by budgets of its own (queued
        # request bodies, replies not yet out of the process), is not what the ceiling is for: a
        # kernel busy within those never passes it.  (Ints read across threads: the GIL.)
        accounted = self.router.queued_bytes + self.peers.total
        with self._inbound_lock:
            over = self._statm is not None and self.inbound.over_ceiling(rss, now, accounted)
            go = self.inbound.due(rss, now) if self._statm is not None else now >= self.inbound.next_scan
        if over:
            self._ceiling_cut(rss, now)
        elif not go:
            return
        else:
            self._look_inbound(now)
        spent = time.monotonic() - now
        try:
            rss = self._rss()
        except (OSError, ValueError, IndexError):
            pass
        with self._inbound_lock:
            self.inbound.scanned(rss, now + spent, spent)

    def _ceiling_cut(self, rss: int, now: float) -> None:
        """(watcher thread) The kernel's resident set is past ``inbound_rss_ceiling`` above its
        baseline: every connection is looked at afresh (which cuts those past their budgets);
        if that cut none, the one holding the most unread bytes is cut -- the backstop for memory
        the wire meter does not see (libzmq's per-frame cost).  Logged loudly, counted; repeated
        each tick after a settling time until the resident set is under the ceiling again."""
        if self._look_inbound(now):
            with self._inbound_lock:
                self.inbound.settle_until = now + quotas.RSS_CEILING_SETTLE_S
                self.inbound.cut_above = self.inbound.rss_above
            return
        with self._inbound_lock:
            fd = self.inbound.holder(now)
            if fd is None:
                fd = self.inbound.holder_unix(now)
            m = self.inbound.meters.get(fd) if fd is not None else None
            if m is not None:
                self.inbound.cut(m, quotas.IN_RSS)
            base = self.inbound.rss_baseline or 0
            above = self.inbound.rss_above  # less what the kernel accounts for itself
            ceiling = self.inbound.rss_ceiling
            nothing = self.inbound.counters["rss_ceiling_nothing_to_cut"]
        if fd is None or m is None:
            if nothing == 1 or nothing % 1000 == 0:  # each tick past it: said once, then counted
                log.error("kernel RSS %.1f MB is %.1f MB above its baseline %.1f MB (less what it accounts for "
                          "itself), past inbound_rss_ceiling (%.1f MB), and no connection holds unread bytes to "
                          "cut (tcp), nor was seen sending while the kernel read nothing from it (ipc) "
                          "(%d times so far)", rss / 1e6, above / 1e6, base / 1e6, ceiling / 1e6, nothing)
            return
        what = (f"an ipc connection seen sending ({m.queued} bytes queued over the samples) while the kernel "
                f"read nothing from it" if m.unix else f"{m.unread} bytes on the wire the kernel has not seen")
        log.error("kernel RSS %.1f MB is %.1f MB above its baseline %.1f MB (less what it accounts for itself), "
                  "past inbound_rss_ceiling (%.1f MB): cutting connection fd %d, the largest holder (%s)",
                  rss / 1e6, above / 1e6, base / 1e6, ceiling / 1e6, fd, what)
        self._cut_inbound(fd, m, quotas.IN_RSS)

    def _look_inbound(self, now: float) -> int:
        """(watcher thread) Look at every tcp connection: one past ``peer_in_bytes`` of bytes libzmq
        read and the kernel has not (a multipart message still coming in, or messages waiting for
        the loop) is cut at once; so is the one holding the most when all of them together pass
        ``peers_in_bytes``.  Past half the resident-set ceiling, each ipc:// connection's receive
        queue is sampled too (the ceiling's evidence, ``InboundMeters.sample_unix``).  Returns how
        many connections were cut."""
        cuts: list[tuple[int, quotas.InboundMeter, str]] = []
        meters = self.inbound.meters
        with self._inbound_lock:
            live = [(fd, m) for fd, m in meters.items() if not m.cut and not m.unix]
            unix = [(fd, m) for fd, m in meters.items() if m.unix and not m.cut] if self.inbound.window else []
        for fd, m in unix:  # past half the ceiling: evidence on ipc:// connections (holder_unix)
            received = m.received
            try:
                inq = int(struct.unpack("i", fcntl.ioctl(fd, _SIOCINQ, b"\0\0\0\0"))[0])
            except OSError:
                continue
            with self._inbound_lock:
                if meters.get(fd) is m:
                    self.inbound.sample_unix(m, received, inq)
        for fd, m in live:  # the system calls outside the lock (the loop takes it for a new peer)
            received = m.received  # before the socket: a frame read meanwhile only adds
            try:
                read: int | None = _tcp_read(fd)
            except OSError:
                read = None
            with self._inbound_lock:
                if meters.get(fd) is not m:
                    continue  # closed, or replaced by a newer connection, meanwhile
                if read is None:
                    self.inbound.close(fd, m.ino)
                elif self.inbound.look(m, received, read, now) is not None:
                    cuts.append((fd, m, quotas.IN))
        fresh: set[int] = set()  # a candidate of a total cut is looked at again first (stale: not cut)
        while True:
            with self._inbound_lock:
                big = self.inbound.largest()
                if big is None:
                    break
                m = meters[big]
                if big in fresh:
                    self.inbound.cut(m, quotas.IN_TOTAL)
                    cuts.append((big, m, quotas.IN_TOTAL))
                    continue
            fresh.add(big)
            received = m.received
            try:
                read = _tcp_read(big)
            except OSError:
                read = None
            with self._inbound_lock:
                if meters.get(big) is not m:
                    continue
                if read is None:
                    self.inbound.close(big, m.ino)
                elif self.inbound.look(m, received, read, time.monotonic()) is not None:
                    cuts.append((big, m, quotas.IN))
        for fd, m, why in cuts:
            self._cut_inbound(fd, m, why)
        return len(cuts)

    def _cut_inbound(self, fd: int, m: quotas.InboundMeter, why: str) -> None:
        """(watcher thread) Shut the connection on ``fd`` down now, abortively (libzmq sees it
        fail, drops the partial message it held and frees the pipe); the loop then drops its
        routing id (its requests answered, cancelled, logged)."""
        with self._inbound_lock:
            self.inbound.freed(time.monotonic())
        try:
            with _dup_if(fd, m.ino) as s:  # closed and reused meanwhile: OSError, not that connection
                s.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _ABORT_LINGER)
                s.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(self._inbound_cut, fd, m.ino, m.unread, why)

    def _inbound_cut(self, fd: int, ino: int, unread: int, why: str) -> None:
        """(loop) The watcher cut the connection on ``fd``: its routing id, if it sent a message
        the kernel read, is dropped through the usual path; else the cut is logged."""
        now = time.monotonic()
        identity = self.peers.by_fd.get(fd)
        acct = self.peers.accounts.get(identity) if identity is not None else None
        if acct is not None and acct.ino == ino and identity is not None:
            self._drop(identity, why, now, unread=unread)
            return
        if any(d[0] == fd and d[1] == ino for d in self._dropping.values()):
            return  # dropped already (and logged), still sending: cut sooner than its linger
        ok, suppressed = self._drop_log.take("?", now)
        if ok and why == quotas.IN_RSS:
            log.warning("connection fd %d cut before its first message: the kernel's resident set was past "
                        "inbound_rss_ceiling and it held the most (%s)%s", fd,
                        f"{unread} bytes unread" if unread else "ipc://: sending, nothing of it reaching the kernel",
                        f" ({suppressed} more drops not logged)" if suppressed else "")
        elif ok:
            log.warning("connection fd %d cut before its first message: it sent %d bytes the kernel had not yet "
                        "seen, past its budget of %d%s%s", fd, unread, self.inbound.in_bytes,
                        _CUT_WHY.get(why, ""),
                        f" ({suppressed} more drops not logged)" if suppressed else "")

    def _drain_monitor(self, now: float) -> int:
        """Apply the queued accept/close events to the guard; returns the descriptors open."""
        fds = open_fds()  # once per batch: listing /proc/self/fd is O(descriptors)
        # The watcher stops accepting on its own count (the guard's plus the events not yet
        # applied), which runs ahead where accepted connections have closed already: if the guard
        # is still under its cap once they are applied, accepting resumes now, not at 3/4 of it.
        watcher_paused = not self._accepting and self.guard.open
        with self._events_lock:
            events = self._events
            self._events = collections.deque()
            self._since_drain = 0
        while events:
            event = events.popleft()
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                fds += 1
                self._count_refusal(self.guard.on_accepted(fd, now, fds, _fd_inode(fd)))
            else:
                self.guard.on_closed(fd)
                self._peer_fd_closed(fd)
        change = self.guard.accepting(fds)
        if change is None and watcher_paused and self.guard.open:
            self.guard.counters["accept_pauses_undone"] += 1
            change = True
        if change is not None:
            self._set_accepting(change)
        return fds

    def _set_accepting(self, accept: bool) -> None:
        """Stop (or resume) accepting connections: rename each ipc:// socket to a hidden name and
        back (kernel.peers: libzmq aborts on EMFILE in an ipc accept, and has no way to stop a
        listener without closing what it accepted); a tcp:// listener gets a socket filter that
        drops new connections' handshakes (kernel.peers.TcpListener; libzmq would otherwise spin
        on EMFILE there).  Idempotent; called from the loop and the watcher."""
        with self._accept_lock:
            if self._accepting == accept:
                return
            self._accepting = accept
            self._rename_endpoints(accept)

    def _rename_endpoints(self, accept: bool) -> None:
        for ep in (self.endpoint, self.control):
            if not ep.startswith("ipc://"):
                continue
            path = ep[len("ipc://"):]
            hidden = path + P.IPC_PAUSED_SUFFIX
            try:
                if accept:
                    os.rename(hidden, path)
                else:
                    os.rename(path, hidden)
            except OSError as exc:
                log.warning("cannot %s accepting on %s: %s", "resume" if accept else "stop", ep, exc)
        for listener in self._listeners:
            try:
                if accept:
                    listener.resume()
                else:
                    listener.pause()
            except OSError as exc:
                log.warning("cannot %s accepting on tcp %s: %s", "resume" if accept else "stop",
                            listener.address, exc)
        if accept:
            log.warning("accepting connections again (%d peers)", len(self.guard.conns))
        else:
            log.warning("stopped accepting connections: %d peers, cap %d (descriptor limit %d)",
                        len(self.guard.conns), self.guard.cap, self.guard.fd_limit)

    def _shutdown_refused(self, now: float) -> None:
        if not self.guard.refusing:
            return
        # Events first: a refused descriptor closed (and perhaps reused) since is forgotten.
        self._drain_monitor(now)
        for fd in self.guard.due(now):
            try:
                # A duplicate of the descriptor: shutdown() ends the connection itself (libzmq then
                # sees it close and frees it); closing the duplicate leaves libzmq's fd alone.
                with _socket.socket(fileno=os.dup(fd)) as s:
                    s.shutdown(_socket.SHUT_RDWR)
            except OSError as exc:
                if exc.errno not in (_errno.EBADF, _errno.ENOTSOCK, _errno.ENOTCONN):
                    log.warning("cannot shut down refused connection fd %d: %s", fd, exc)

    def _reconcile(self) -> None:
        try:
            alive = {int(n) for n in os.listdir("/proc/self/fd")}
        except OSError:
            return
        self.guard.reconcile(alive)
        with self._events_lock:  # accept events that never came (a monitor event can be lost)
            self._early &= alive
        for identity, acct in list(self.peers.accounts.items()):  # a close whose event was missed
            if acct.fd not in alive:
                self.peers.forget(identity)
                self._paused.pop(identity, None)
        with self._inbound_lock:  # meters of descriptors closed after their close event was read
            for fd in [fd for fd in self.inbound.meters if fd not in alive]:
                self.inbound.close(fd)

    def next_wakeup(self) -> float:
        """The earliest time the loop's timer has something to do: the router's next wake-up, the
        guard's (a refused connection to shut down) or the next reconcile."""
        return min(self.router.next_wakeup(), self.guard.next_wakeup(), self._next_reconcile)

    def check_invariants(self) -> None:
        """Invariant, after every :meth:`_arm` (the end of a turn that drained messages, of a timer,
        of monitor events): a timer is armed, at or before :meth:`next_wakeup` -- nothing the
        kernel must do at a time waits for a later wake-up.  Run by the tests, never per turn."""
        assert self._timer is not None, "no timer armed"
        wake = self.next_wakeup()
        assert self._timer_at <= wake, f"the timer is armed for {self._timer_at}, after the next wake-up {wake}"

    def _arm(self) -> None:
        """Arm the loop's timer for :meth:`next_wakeup` unless it is armed that early already
        (see :meth:`check_invariants`).  Called after every turn, so the same minimum is taken
        inline: no builtin ``min`` and no call of the guard's when it refuses no connection."""
        wake = self.router.next_wakeup()
        if self._next_reconcile < wake:
            wake = self._next_reconcile
        guard = self.guard
        if guard.refusing:
            refusal = guard.next_wakeup()
            if refusal < wake:
                wake = refusal
        if self._timer is not None and self._timer_at <= wake:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = wake
        self._timer = self._loop.call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        # Input first: messages that waited while this process was not scheduled prove their
        # senders alive, and the liveness sweep must see them before it judges (uvloop runs due
        # timers before polling for I/O).
        if not self._drain():
            return
        now = time.monotonic()
        principals = self.principals
        if principals is not None and now >= self._next_reload:
            # A key removed from the key directory is revoked: its workers are dropped and its
            # messages refused from now on (the ZAP handler refuses its new connections).
            self._next_reload = now + _RELOAD_INTERVAL
            if principals.reload():
                self.router.revoke(lambda name: principals.by_name(name) is not None, now)
        try:
            self.router.tick(now)
            self._check_peers(now)
            self._shutdown_refused(now)
            if now >= self._next_reconcile:
                self._next_reconcile = now + self.router.heartbeat_interval
                self._reconcile()
        except Exception:
            self.router.counters["internal_errors"] += 1
            log.exception("internal error in the kernel tick")
        self._on_readable()

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Route until :meth:`stop` is called (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, self._on_readable)
        pub_fd = self.pub.fileno()
        self._loop.add_reader(pub_fd, self._on_subscriptions)
        self._on_subscriptions()
        self._watcher.start()
        self._on_monitor()
        self._on_readable()
        try:
            await self._stopped.wait()
        finally:
            self._loop.remove_reader(fd)
            self._loop.remove_reader(pub_fd)
            self._watch_stop.set()
            self._watcher.join(5.0)
            if self._timer is not None:
                self._timer.cancel()
            self.close()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def close(self) -> None:
        self._watch_stop.set()
        if self._watcher.is_alive():
            self._watcher.join(5.0)
        for sock, mon in zip((self.sock, self.pub), self._monitors):
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)
        self.sock.close(0)
        self.pub.close(0)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None
        if self.zap is not None:
            self.zap.stop()
        if self._own_context:
            self.context.term()
