"""Per-principal rate quotas whose excess becomes a counter, and per-connection byte budgets (issue 24).

A :class:`RateQuota` is a token bucket per key (a principal's name): ``rate`` units per minute,
``burst`` at most.  :meth:`take` spends ``cost`` units when the bucket holds them; otherwise it
counts the attempt as suppressed and spends nothing.  The next take that succeeds returns how
many were suppressed since the last one, so a caller that records one decision per success
(a ``forbidden`` record, an ``audit`` batch) writes the excess as one number in the next record,
never as records of its own: the log grows at most ``rate`` units per minute per principal
whatever a principal sends.

Pure: time is passed in.  Keys are bounded (``max_keys``; the least recently used bucket is
dropped, which can only make that principal's next take succeed, never fail).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final


class RateQuota:
    def __init__(self, rate_per_min: float, burst: float | None = None, *, max_keys: int = 10_000) -> None:
        if rate_per_min < 0:
            raise ValueError(f"rate must be >= 0, got {rate_per_min}")
        self.rate = rate_per_min / 60.0  # units per second
        self.burst = float(burst if burst is not None else rate_per_min)
        self.max_keys = max_keys
        #: key -> [tokens, at, suppressed since the last success]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.suppressed_total = 0

    def take(self, key: str, now: float, cost: float = 1.0) -> tuple[bool, int]:
        """``(allowed, suppressed before this one)``; the count is returned (and reset) only with
        an allowed take."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now, 0.0]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + max(0.0, now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= cost:
            b[0] -= cost
            n, b[2] = int(b[2]), 0.0
            return True, n
        b[2] += 1
        self.suppressed_total += 1
        return False, 0

    def pending(self, key: str) -> int:
        """Attempts of ``key`` suppressed since its last allowed one."""
        b = self._buckets.get(key)
        return int(b[2]) if b is not None else 0


# -- per-peer byte budgets (issue 24, item 3) -----------------------------------------------------

#: Bytes of replies the kernel may hold for one client connection that have not left its process
#: (config ``kernel.peer_out_bytes``): held past it for ``PEER_OUT_GRACE_S``, or at twice it at
#: once, the peer is dropped.
PEER_OUT_BYTES: Final = 32 * 1024 * 1024
#: Bytes of one client connection's requests the kernel may hold queued (config
#: ``kernel.peer_in_bytes``); past it the peer is dropped at once.  More than one largest message
#: (``MAX_MESSAGE_SIZE``, 16 MiB), less than every queue together (``MAX_QUEUED_BYTES``, 32 MiB).
PEER_IN_BYTES: Final = 24 * 1024 * 1024
#: Bytes of replies not yet out of the process over every connection together (config
#: ``kernel.peers_out_bytes``): past it the connection holding the most is dropped, so many
#: connections each under its own budget cannot add up to more.
PEERS_OUT_BYTES: Final = 128 * 1024 * 1024
#: Bytes libzmq may hold unread for every tcp connection together before the kernel has seen them
#: (config ``kernel.peers_in_bytes``): past it the connection holding the most is cut
#: (kernel.quotas.InboundMeters).
PEERS_IN_BYTES: Final = 96 * 1024 * 1024
#: How long a connection may stay past its outbound budget before it is dropped, seconds
#: (config ``kernel.peer_out_grace_s``): a reader that catches up within it is kept.
PEER_OUT_GRACE_S: Final = 5.0
#: A peer whose count of bytes not known to have left passes ``out_bytes / SAMPLE_SHARE`` has its
#: connection looked at (at the kernel's next check): what has left is then credited.
SAMPLE_SHARE: Final = 8

#: Flow control: a peer holding ``out_bytes / PAUSE_SHARE`` not yet out has its running requests
#: paused (``preempt``: a stream stops producing at its next safe point), resumed once it holds
#: ``out_bytes / RESUME_SHARE`` or less -- a slow reader is slowed down, not dropped.
PAUSE_SHARE: Final = 4
RESUME_SHARE: Final = 8
#: A pause lasts at least this long, seconds: a connection's pause/resume orders (each a
#: decision-log record, and a paused/resumed note from the worker) are at most two a second.
MIN_PAUSE_S: Final = 0.5
PAUSE: Final = "pause"
RESUME: Final = "resume"

#: Why a peer was dropped (the ``quota`` of the error its requests get, and the stats key).
OUT: Final = "peer_out_bytes"
IN: Final = "peer_in_bytes"
TOTAL: Final = "peers_out_bytes"
IN_TOTAL: Final = "peers_in_bytes"  #: every connection's unread bytes together (InboundMeters.largest)
#: the kernel's resident set past its ceiling: the connection holding the most unread is cut
#: (InboundMeters.over_ceiling / holder)
IN_RSS: Final = "inbound_rss_ceiling"
_DROP_COUNTER = {OUT: "dropped_out", IN: "dropped_in", TOTAL: "dropped_total", IN_TOTAL: "dropped_in_total",
                 IN_RSS: "dropped_in_rss"}
_UNREAD_COUNTER = {IN: "dropped_unread", IN_TOTAL: "dropped_unread_total", IN_RSS: "dropped_unread_rss"}


@dataclass(slots=True)
class PeerAccount:
    """What the kernel knows of one client connection (a ROUTER routing id).

    Invariant: ``0 <= credited <= sent``; ``outstanding = sent - credited`` is what the kernel
    has handed libzmq for this peer and has no evidence of having left its process."""

    fd: int  #: the connection's descriptor (libzmq's), -1 when the transport has none
    ino: int  #: its socket's inode: a descriptor number reused by another connection differs
    tcp: bool  #: tcp: exact evidence (bytes acknowledged + still queued); else a unix socket
    sent: int = 0  #: bytes of client messages handed to libzmq for this peer
    credited: int = 0  #: of those, bytes known to have left the process
    left: int = 0  #: tcp: the connection's bytes acknowledged + queued in the OS at the last sample
    sent_at_sample: int = 0  #: unix: ``sent`` at the last sample
    over_since: float | None = None  #: when it was first seen past the soft budget (None: it is not)
    paused: bool = False  #: its streams were asked to pause (flow control) and not yet resumed
    progress: int = 0  #: while paused: ``credited`` when it last grew (or at the pause)
    progress_at: float = 0.0  #: ... and when
    paused_at: float = 0.0  #: when the pause began
    room_below: int = 0  #: unix: the OS queue is "with room" below this many bytes (half its buffer)
    who: str = ""  #: the principal of the connection (for the log)
    meter: "InboundMeter | None" = None  #: tcp: its connection's inbound meter (InboundMeters)

    @property
    def outstanding(self) -> int:
        return self.sent - self.credited


class PeerBudgets:
    """Per-connection byte budgets: the kernel's own account, per routing id, of the bytes it holds
    for a peer (issue 24: libzmq has no per-connection byte count and its high-water marks count
    messages).  Pure: time and the transport's evidence are passed in (the server samples the
    connection's socket, kernel.server).

    * **Outbound**: every client message the kernel hands libzmq is counted against its routing id
      (:meth:`sent`); the bytes that have *left the process* are credited from the connection's
      socket (:meth:`sample_tcp`: TCP's bytes acknowledged plus those still in the OS queue,
      exact and cumulative; :meth:`sample_unix`: a unix socket with room in its queue has taken
      everything sent before the previous sample -- an approximation that can only credit too
      early by up to what libzmq's I/O thread has not yet written, and late by one look; the
      server looks at a unix peer past ``sample_at`` at every send to it).  The peer cannot
      fake this evidence (a client's own acknowledgement could lie).  Past ``out_bytes`` for
      ``grace`` seconds the peer is to be dropped (:meth:`judge`); past twice it, at once, and
      nothing more is handed to libzmq for it (:meth:`may_send`).
    * **Inbound**: the bytes of the peer's requests the kernel holds queued (the router's count,
      passed to :meth:`judge`); past ``in_bytes`` the peer is to be dropped at once.

    * **Flow control**: past ``out_bytes / PAUSE_SHARE`` the peer's running requests are to be
      paused (a stream stops at its next safe point), and resumed at ``out_bytes / RESUME_SHARE``
      (:meth:`flow`): a slow reader is slowed down before any budget drops it; one paused that
      reads nothing for ``grace`` is dropped.
    * **All connections together**: past ``total_bytes`` outstanding, the connection holding the
      most is to be dropped (:meth:`largest`), so the bound on the process is ``total_bytes``
      (plus what is sent between two looks), not connections x ``out_bytes``.

    Invariants (:meth:`check_invariants`): every account's descriptor maps back to it in
    ``by_fd`` (one live connection per descriptor); ``0 <= credited <= sent``; ``total`` is the
    sum of the accounts' outstanding bytes; ``hot`` holds only accounted peers.  Accounts are bounded by the live connections (one per descriptor).
    """

    def __init__(self, out_bytes: int = PEER_OUT_BYTES, in_bytes: int = PEER_IN_BYTES,
                 grace: float = PEER_OUT_GRACE_S, total_bytes: int = PEERS_OUT_BYTES) -> None:
        if out_bytes <= 0 or in_bytes <= 0 or grace < 0 or total_bytes <= 0:
            raise ValueError("peer budgets must be positive")
        self.out_bytes = out_bytes
        self.total_bytes = total_bytes
        #: Outstanding bytes of every account together.
        self.total = 0
        self.hard_bytes = 2 * out_bytes
        self.in_bytes = in_bytes
        self.grace = grace
        self.sample_at = max(1, out_bytes // SAMPLE_SHARE)
        self.pause_at = max(1, out_bytes // PAUSE_SHARE)
        self.resume_at = out_bytes // RESUME_SHARE
        self.accounts: dict[bytes, PeerAccount] = {}
        self.by_fd: dict[int, bytes] = {}
        #: Peers whose outstanding bytes passed ``sample_at``: looked at by the next check.
        self.hot: set[bytes] = set()
        self.counters: dict[str, int] = {"dropped_out": 0, "dropped_in": 0, "dropped_total": 0, "dropped_in_total": 0,
                                         "dropped_in_rss": 0,
                                         "samples": 0,
                                         "pauses": 0, "resumes": 0,
                                         "sends_refused": 0, "max_outstanding": 0}

    def open(self, identity: bytes, fd: int, ino: int, tcp: bool, left: int = 0, room_below: int = 0,
             who: str = "") -> PeerAccount:
        """Account ``identity``, seen first on descriptor ``fd`` (``left``: a tcp connection's
        bytes out of the process so far).  Another routing id on the same descriptor is a
        connection that has closed: its account goes."""
        old = self.by_fd.get(fd)
        if old is not None and old != identity:
            self.forget(old)
        self.forget(identity)
        acct = self.accounts[identity] = PeerAccount(fd, ino, tcp, left=left, room_below=room_below, who=who)
        self.by_fd[fd] = identity
        return acct

    def forget(self, identity: bytes) -> PeerAccount | None:
        acct = self.accounts.pop(identity, None)
        if acct is not None:
            self.total -= acct.outstanding
            if self.by_fd.get(acct.fd) == identity:
                del self.by_fd[acct.fd]
            self.hot.discard(identity)
        return acct

    def closed(self, fd: int) -> bytes | None:
        """The connection on ``fd`` closed: its account goes (returns its routing id)."""
        identity = self.by_fd.get(fd)
        if identity is not None:
            self.forget(identity)
        return identity

    def sent(self, acct: PeerAccount, identity: bytes, nbytes: int) -> None:
        """``nbytes`` of a client message were handed to libzmq for ``identity``."""
        acct.sent += nbytes
        self.total += nbytes
        if acct.sent - acct.credited >= self.sample_at:
            self.hot.add(identity)

    def may_send(self, acct: PeerAccount) -> bool:
        """False when the peer holds twice its outbound budget (after a fresh sample): the message
        is not handed to libzmq (the peer is being dropped)."""
        return acct.sent - acct.credited < self.hard_bytes

    def sample_tcp(self, acct: PeerAccount, left: int) -> None:
        """A tcp connection has had ``left`` bytes leave the process (acknowledged by the peer's
        TCP, or queued in the OS), cumulative over the connection."""
        self.counters["samples"] += 1
        if left > acct.left:
            credited = min(acct.sent, acct.credited + (left - acct.left))
            self.total -= credited - acct.credited
            acct.credited = credited
            acct.left = left

    def sample_unix(self, acct: PeerAccount, room: bool) -> None:
        """A unix socket ``room``: its OS queue is less than half full, so libzmq is writing to it
        freely and has written what was sent before the previous sample."""
        self.counters["samples"] += 1
        if room and acct.sent_at_sample > acct.credited:
            self.total -= acct.sent_at_sample - acct.credited
            acct.credited = acct.sent_at_sample
        acct.sent_at_sample = acct.sent

    def judge(self, identity: bytes, held_in: int, now: float) -> str | None:
        """After a sample: the budget ``identity`` is past (:data:`OUT`, :data:`IN`) and must be
        dropped for, or None.  Updates the over-budget clock."""
        if held_in > self.in_bytes:
            return IN
        acct = self.accounts.get(identity)
        if acct is None:
            return None
        out = acct.outstanding
        if acct.paused:
            # Paused and reading nothing for the grace: stalled (it would hold its paused
            # requests, and what was on its way, for ever).
            if acct.credited > acct.progress:
                acct.progress, acct.progress_at = acct.credited, now
            elif now - acct.progress_at >= self.grace:
                return OUT
        if out > self.counters["max_outstanding"]:
            self.counters["max_outstanding"] = out
        if out < self.sample_at and not acct.paused:  # a paused peer stays watched (resume, stall)
            self.hot.discard(identity)
        if out <= self.out_bytes:
            acct.over_since = None
            return None
        if out >= self.hard_bytes:
            return OUT
        if acct.over_since is None:
            acct.over_since = now
        return OUT if now - acct.over_since >= self.grace else None

    def largest(self) -> bytes | None:
        """When every connection together is past ``total_bytes``: the one holding the most (to
        be dropped, after a fresh look at the hot ones), else None.  O(accounts), only then."""
        if self.total <= self.total_bytes or not self.accounts:
            return None
        return max(self.accounts, key=lambda i: self.accounts[i].outstanding)

    def flow(self, identity: bytes, acct: PeerAccount, now: float) -> str | None:
        """Flow control after a look: :data:`PAUSE` when the peer's streams should pause (past
        ``pause_at``), :data:`RESUME` when paused ones may go on (at ``resume_at`` or less).  A
        paused peer that has nothing more credited for ``grace`` is dropped (:meth:`judge`)."""
        out = acct.outstanding
        if not acct.paused and out >= self.pause_at:
            acct.paused = True
            self.hot.add(identity)
            acct.progress, acct.progress_at, acct.paused_at = acct.credited, now, now
            self.counters["pauses"] += 1
            return PAUSE
        if acct.paused and out <= self.resume_at and now - acct.paused_at >= MIN_PAUSE_S:
            acct.paused = False
            self.counters["resumes"] += 1
            return RESUME
        return None

    def dropped(self, identity: bytes, why: str) -> PeerAccount | None:
        """``identity`` is dropped for ``why``: counted, and its account returned (and forgotten)."""
        self.counters[_DROP_COUNTER[why]] += 1
        return self.forget(identity)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "peers": len(self.accounts), "hot": len(self.hot),
                "out_bytes": self.out_bytes, "in_bytes": self.in_bytes, "total_bytes": self.total_bytes,
                "outstanding": self.total}

    def check_invariants(self) -> None:
        for identity, acct in self.accounts.items():
            assert self.by_fd.get(acct.fd) == identity, "an account's descriptor maps elsewhere"
            assert 0 <= acct.credited <= acct.sent, f"credited {acct.credited} outside [0, {acct.sent}]"
        assert len(self.by_fd) == len(self.accounts), "by_fd and accounts disagree"
        assert self.total == sum(a.outstanding for a in self.accounts.values()), "total disagrees"
        assert self.hot <= self.accounts.keys(), "a hot peer without an account"
        assert all(i in self.hot for i, a in self.accounts.items() if a.paused), "a paused peer not watched"


# -- inbound: what libzmq holds for a connection before the kernel sees it (issue 24) --------------

#: Bytes a peer sends that the kernel never receives as a frame: the ZMTP greeting and handshake
#: (measured 107 B without security, 567 B under CURVE; socket metadata adds its size).
HANDSHAKE_ALLOWANCE: Final = 4096
#: How often the inbound watcher reads the kernel's resident set, seconds.
INBOUND_TICK_S: Final = 0.01
#: ... and looks at every tcp connection once the resident set has grown this much since the last
#: look (bytes libzmq holds are resident: they were just written): the bound is
#: ``peer_in_bytes`` + this + receive rate x (the tick + the look + scheduling delay).
INBOUND_SCAN_STEP: Final = 4 * 1024 * 1024
#: After a look at every connection the next waits at least this many times as long as the look
#: took: the watcher uses at most 1 / (1 + this) of a CPU however many connections there are (a
#: look is ~5-20 us: an ioctl and a getsockopt).
INBOUND_PAUSE_PER_LOOK: Final = 4
#: CURVE: each frame travels as a MESSAGE command: ``\x07MESSAGE``, an 8-byte nonce, the 16-byte
#: MAC and a flags byte around the payload (libzmq curve_mechanism_base_t::encode).
CURVE_FRAME_OVERHEAD: Final = 33
#: Why a connection was cut inbound (the stats key; the error's ``quota`` is :data:`IN`).
UNREAD: Final = "unread"
#: After a cut at the resident-set ceiling, the next waits this long: libzmq frees the cut
#: connection's memory on its I/O thread, and the resident set must get the chance to fall
#: before another connection is judged by it (a cut every tick would cut every holder at once).
RSS_CEILING_SETTLE_S: Final = 0.5
#: ... unless the resident set grows this many ``INBOUND_SCAN_STEP`` more after a ceiling cut:
#: a cut connection adds nothing, so growth is another connection's (3 connections sending
#: empty frames at once peaked at +317 MB with the settling time alone; +243 MB with 4, +223 MB
#: with 2; 6 connections +273 / +264 MB).
CEILING_REGROW: Final = 2
#: How often free memory is handed back (glibc ``malloc_trim``) while that is due (:meth:`InboundMeters.trim_due`).
TRIM_EVERY_S: Final = 0.25
#: (ipc://) The least seen queued over a window's samples for a unix connection to be cut at the
#: ceiling: a heartbeat caught in a queue is tens of bytes; an attacker streaming an unfinished
#: message was seen with 2.6 MB (4M empty frames).
UNIX_QUEUED_MIN: Final = 64 * 1024
#: (tcp) The least unread a connection must hold to be cut at the ceiling: an honest request in
#: flight at a look holds a few KiB; 4M empty frames were cut holding 6.3 MB.  (Several
#: connections each holding less are each under 2 MB of resident set.)
TCP_UNREAD_MIN: Final = 64 * 1024
#: The default ceiling, as a multiple of ``peers_in_bytes`` (every tcp connection's unread wire
#: bytes together): room for that, plus libzmq's per-frame and per-message overhead of an honest
#: load, before the kernel's own memory says something the wire meter did not see.
RSS_CEILING_PER_PEERS_IN: Final = 2
#: ... and never less than this by default (a small ``peers_in_bytes`` would otherwise put the
#: ceiling within the reach of the kernel's own state).
RSS_CEILING_MIN: Final = 64 * 1024 * 1024
#: After a cut, the kernel hands free memory back to the system (glibc ``malloc_trim``) every
#: :data:`TRIM_EVERY_S` for this long: libzmq frees a cut (or closed) connection's frames on its I/O
#: thread, into an arena glibc does not trim by itself (4M empty frames: +200 MB kept after the cut).
TRIM_AFTER_CUT_S: Final = 10.0


def rss_ceiling_for(peers_in_bytes: int | None, ceiling: int | None = None) -> int:
    """The ``inbound_rss_ceiling`` in force: ``ceiling`` when configured, else
    :data:`RSS_CEILING_PER_PEERS_IN` x ``peers_in_bytes`` (its default when None), at least
    :data:`RSS_CEILING_MIN`."""
    if ceiling is not None:
        return ceiling
    total = peers_in_bytes if peers_in_bytes is not None else PEERS_IN_BYTES
    return max(RSS_CEILING_PER_PEERS_IN * total, RSS_CEILING_MIN)


def frame_wire(curve: bool) -> tuple[int, int, int]:
    """``(cut, small, large)``: a frame of ``n`` payload bytes is ``n + small`` bytes on the wire
    when ``n < cut``, else ``n + large`` (ZMTP 3: a flags byte and a 1-byte size up to 255, an
    8-byte size past it; under CURVE the size is the MESSAGE command's)."""
    extra = CURVE_FRAME_OVERHEAD if curve else 0
    return 256 - extra, 2 + extra, 9 + extra


def subscription_wire(data: bytes, curve: bool) -> int:
    """The most a frame ``data`` read from the control (XPUB) socket took on the wire: a
    subscription (``\\x01`` + topic) travels as a SUBSCRIBE command, 9 bytes more than as a message,
    a cancel (``\\x00`` + topic) as a CANCEL, 6 more; any other frame as a message (its real size:
    crediting more would let a peer bank credit against bytes it holds later)."""
    n = len(data)
    extra = 9 if n and data[0] == 1 else 6 if n and data[0] == 0 else 0
    return wire_bytes(n + extra, curve)


def wire_bytes(n: int, curve: bool) -> int:
    """The bytes a frame of ``n`` payload bytes takes on the wire (see :func:`frame_wire`)."""
    cut, small, large = frame_wire(curve)
    return n + (small if n < cut else large)


@dataclass(slots=True)
class InboundMeter:
    """One tcp connection's inbound account.  ``received`` is written by the kernel's loop only
    (a frame read), the rest by the watcher only (a look)."""

    ino: int  #: the socket's inode (a descriptor number reused by another connection differs)
    received: int = 0  #: wire bytes of the frames the kernel has read from this connection
    unread: int = 0  #: at the last look: bytes libzmq read off the socket the kernel has not
    looked_at: float = 0.0  #: when
    #: The most ``received`` was seen past ``read`` at a look (bytes credited that were never on
    #: the wire, e.g. a subscription sent in message form): subtracted from ``received``, so
    #: over-credit offsets at most what arrives between two looks, never later bytes.
    offset: int = 0
    cut: bool = False  #: past its budget: being shut down (no more looks)
    #: A unix (ipc://) connection: no count of bytes received, so never looked at as above; past
    #: the resident-set ceiling it is judged by :meth:`InboundMeters.sample_unix` instead.
    unix: bool = False
    mark: int = -1  #: (unix) ``received`` when last sampled: what the kernel had read from it
    mark_epoch: int = -1  #: (unix) the window (:attr:`InboundMeters.epoch`) of ``queued``
    #: (unix) bytes seen in its receive queue, summed over the samples of this window since the
    #: kernel last read a frame from it: evidence it is sending and nothing reaches the kernel
    queued: int = 0


class InboundMeters:
    """Bytes libzmq holds for each connection that the kernel has not received yet -- a multipart
    message is handed over only once its last frame is in, and the pipe's high-water mark counts
    messages, so without this one connection could make the kernel hold a 1,000-frame message of
    1 MiB frames (1 GB) before it sees a byte of it.

    The evidence is the operating system's, not the peer's: for a tcp connection, the bytes it has
    received (``tcpi_bytes_received``, cumulative, Linux >= 4.1) minus those still in its receive
    queue (``SIOCINQ``) are what libzmq has read off the socket (``read``, passed to :meth:`look`);
    minus the wire size of every frame the kernel has read from that connection (``received``,
    :func:`wire_bytes`, exact: checked against TCP_INFO, plain and CURVE) minus the handshake
    (:data:`HANDSHAKE_ALLOWANCE`) is what sits in libzmq's buffers for it.  Past ``in_bytes`` the
    connection is to be cut (:meth:`look` returns :data:`IN`); past ``total_bytes`` over every
    connection together the one holding the most is (:meth:`largest`).  When to look at every
    connection is decided from the kernel's resident set (:meth:`due`): bytes libzmq holds are
    resident, so a look follows every ``scan_step`` of growth within one tick.

    Pure: time and evidence are passed in; not thread-safe (the server holds a lock around every
    call but the loop's ``received +=``, whose only writer it is).  The caller reads ``received`` *before* the socket, so
    a frame read in between can only make ``unread`` larger, never hide bytes; nothing is banked
    (``received`` past ``read`` at a look is over-credit: kept in the meter's ``offset`` and taken off
    from then on, so it never offsets later bytes).  Invariants (:meth:`check_invariants`):
    ``unread >= 0``; ``total`` is the sum of the live meters' ``unread``; ``unread_max`` is at least
    every ``unread`` seen.  Meters are bounded by the live connections (one per descriptor).

    The backstop for what the wire count does not see (libzmq's per-frame cost; ipc://
    connections, which have no count): the kernel's resident set, less what it accounts for
    itself, past ``rss_ceiling`` above its least (:meth:`over_ceiling`) -- then the connection
    holding the most (:meth:`holder`; ipc: :meth:`holder_unix`, evidence from
    :meth:`sample_unix`) is cut, and free memory is handed back after cuts and closes
    (:meth:`freed`, :meth:`trim_due`)."""

    def __init__(self, in_bytes: int = PEER_IN_BYTES, total_bytes: int | None = None,
                 allowance: int = HANDSHAKE_ALLOWANCE, rss_ceiling: int | None = None) -> None:
        if in_bytes <= 0 or allowance < 0 or (total_bytes is not None and total_bytes <= 0):
            raise ValueError("inbound budgets must be positive")
        if rss_ceiling is not None and rss_ceiling <= 0:
            raise ValueError("the resident-set ceiling must be positive")
        self.in_bytes = in_bytes
        self.total_bytes = total_bytes
        self.allowance = allowance
        #: Bytes the kernel's resident set may grow above ``rss_baseline`` before the connection
        #: holding the most unread is cut (:meth:`over_ceiling`, :meth:`holder`): the backstop for
        #: what the wire meter does not see (libzmq's 64-byte ``msg_t`` per frame: 4M empty frames
        #: are 8 MB on the wire and +257 MB resident).
        self.rss_ceiling = rss_ceiling_for(total_bytes, rss_ceiling)
        #: The least resident set seen (the kernel's at rest; None until the first reading).
        self.rss_baseline: int | None = None
        self.rss_above = 0  #: at the last reading: the resident set above ``rss_baseline``
        self.settle_until = 0.0  #: no ceiling cut before this (after the last one) ...
        self.cut_above = 0  #: ... unless ``rss_above`` grew :data:`CEILING_REGROW` x ``scan_step`` past this
        self.over = False  #: the last reading was past the ceiling (to count each passing once)
        self.trim_until = 0.0  #: free memory is handed back until then (:meth:`trim_due`)
        #: The resident set is half the ceiling or more above its baseline: unix connections are
        #: sampled at each look (:meth:`sample_unix`); ``epoch`` counts these windows.
        self.window = False
        self.epoch = 0
        self.next_trim = 0.0
        self.meters: dict[int, InboundMeter] = {}
        self.total = 0
        self.scan_step = INBOUND_SCAN_STEP
        #: The resident set at the last look at every connection (or the least seen since).
        self.rss_base: int | None = None
        self.next_scan = 0.0
        self.counters: dict[str, int] = {"dropped_unread": 0, "dropped_unread_total": 0, "looks": 0,
                                         "unread_max": 0, "scans": 0, "dropped_unread_rss": 0,
                                         "rss_ceiling_passes": 0, "rss_ceiling_nothing_to_cut": 0,
                                         "rss_above_max": 0, "trims": 0}

    def meter(self, fd: int, ino: int, unix: bool = False) -> InboundMeter:
        """The meter of the connection on ``fd`` (inode ``ino``; ``unix``: an ipc:// one), made if
        new; one of an older connection on the same descriptor number is replaced."""
        m = self.meters.get(fd)
        if m is None or m.ino != ino:
            if m is not None and not m.cut:
                self.total -= m.unread
            m = self.meters[fd] = InboundMeter(ino, unix=unix)
        return m

    def sample_unix(self, m: InboundMeter, received: int, inq: int) -> None:
        """(within the window) A sample of a unix connection: ``received`` (the meter's) and
        ``inq``, its receive queue now.  A frame read since the last sample (or a new window)
        clears the evidence (it completes messages); else what is queued adds to ``queued``."""
        if m.mark_epoch != self.epoch or received != m.mark:
            m.mark, m.mark_epoch, m.queued = received, self.epoch, 0  # evidence from the next sample on
        else:
            m.queued += inq

    def holder_unix(self, now: float) -> int | None:
        """Past the ceiling with no tcp connection holding unread bytes: the descriptor of the
        unix connection with the most bytes seen queued (:meth:`sample_unix`) in this window since
        the kernel last read from it -- one sending while nothing it sends reaches the kernel
        (an unfinished message) -- or None.  Not exact (no count of what libzmq holds): docs/limits.md."""
        self.settle_until, self.cut_above = now + RSS_CEILING_SETTLE_S, self.rss_above
        live = [(m.queued, fd) for fd, m in self.meters.items()
                if m.unix and not m.cut and m.mark_epoch == self.epoch and m.queued >= UNIX_QUEUED_MIN]
        if not live:
            self.counters["rss_ceiling_nothing_to_cut"] += 1
            return None
        return max(live)[1]

    def due(self, rss: int, now: float) -> bool:
        """Whether every connection is to be looked at now: the kernel's resident set ``rss`` has
        grown ``scan_step`` since the last look (measured from the least it was since), and the
        pause after that look is over.  Memory libzmq holds is resident, so nothing grows by more
        than ``scan_step`` + what arrives within a tick unlooked at."""
        if self.rss_base is None or rss < self.rss_base:
            self.rss_base = rss
        return rss - self.rss_base >= self.scan_step and now >= self.next_scan

    def over_ceiling(self, rss: int, now: float, accounted: int = 0) -> bool:
        """A reading of the kernel's resident set ``rss``, of which ``accounted`` bytes the kernel
        holds by its own account under budgets of its own (queued requests, replies not yet out:
        not counted against the ceiling; the baseline is of ``rss`` alone, so an overstated
        ``accounted`` is lenient for that reading only): whether it is past ``rss_baseline`` +
        ``rss_ceiling`` and the settling time after the last ceiling cut is over (the caller then
        looks at every connection afresh and cuts :meth:`holder`).  The baseline is the least
        resident set seen: it only falls, so no slow climb moves the ceiling up."""
        if self.rss_baseline is None or rss < self.rss_baseline:
            self.rss_baseline = rss
        self.rss_above = rss - self.rss_baseline - accounted
        if self.rss_above > self.counters["rss_above_max"]:
            self.counters["rss_above_max"] = self.rss_above
        window = self.rss_above >= self.rss_ceiling // 2
        if window and not self.window:
            self.epoch += 1
        self.window = window
        over = self.rss_above > self.rss_ceiling
        if over and not self.over:
            self.counters["rss_ceiling_passes"] += 1
        self.over = over
        regrown = self.rss_above >= self.cut_above + CEILING_REGROW * self.scan_step
        return over and (now >= self.settle_until or regrown)

    def freed(self, now: float) -> None:
        """A connection was cut, or closed, at ``now``: what libzmq held for it is freed, and free
        memory is handed back for a while (:meth:`trim_due`)."""
        self.trim_until = now + TRIM_AFTER_CUT_S
        if self.next_trim < now:  # the first once libzmq has had the time to free it
            self.next_trim = now + TRIM_EVERY_S

    def trim_due(self, now: float) -> bool:
        """Whether to hand free memory back now: every :data:`TRIM_EVERY_S` within
        :data:`TRIM_AFTER_CUT_S` of a cut or close, or past the ceiling -- while the resident set
        is ``scan_step`` or more above its baseline (at rest there is nothing to hand back)."""
        if now >= self.next_trim and self.rss_above >= self.scan_step and (now < self.trim_until or self.over):
            self.next_trim = now + TRIM_EVERY_S
            self.counters["trims"] += 1
            return True
        return False

    def holder(self, now: float) -> int | None:
        """Past the ceiling: the descriptor of the live connection holding the most unread bytes
        (at its last look; :data:`TCP_UNREAD_MIN` at least), to be cut (:meth:`cut` with
        :data:`IN_RSS`); None when none holds that much -- then an ipc:// connection may be
        (:meth:`holder_unix`).  Either way the next ceiling cut waits :data:`RSS_CEILING_SETTLE_S`
        (or :data:`CEILING_REGROW` more growth).  O(meters), only past the ceiling."""
        self.settle_until, self.cut_above = now + RSS_CEILING_SETTLE_S, self.rss_above
        live = [(m.unread, fd) for fd, m in self.meters.items() if not m.cut and m.unread >= TCP_UNREAD_MIN]
        return max(live)[1] if live else None

    def scanned(self, rss: int, now: float, spent: float) -> None:
        """Every connection was looked at (which took ``spent`` seconds; ``rss`` after it)."""
        self.counters["scans"] += 1
        self.rss_base = rss
        self.next_scan = now + INBOUND_PAUSE_PER_LOOK * spent

    def close(self, fd: int, ino: int | None = None) -> None:
        """The connection on ``fd`` is gone (only the meter of inode ``ino`` when given)."""
        m = self.meters.get(fd)
        if m is not None and (ino is None or m.ino == ino):
            del self.meters[fd]
            if not m.cut:
                self.total -= m.unread

    def look(self, m: InboundMeter, received: int, read: int, now: float) -> str | None:
        """A look at a connection: ``received`` (the meter's, read before the socket) and ``read``,
        the bytes libzmq has read off its socket.  Returns :data:`IN` when it is past its budget
        (the meter is marked cut), else None."""
        self.counters["looks"] += 1
        if received - read > m.offset:  # over-credit seen: it offsets nothing from now on
            m.offset = received - read
        unread = max(0, read - self.allowance - (received - m.offset))
        if not m.cut:
            self.total += unread - m.unread
        m.unread, m.looked_at = unread, now
        if unread > self.counters["unread_max"]:
            self.counters["unread_max"] = unread
        if unread > self.in_bytes and not m.cut:
            return self.cut(m, IN)
        return None

    def cut(self, m: InboundMeter, why: str | None) -> str:
        """``m`` is cut for ``why`` (:data:`IN`; :data:`IN_TOTAL`: every connection together;
        :data:`IN_RSS`: the kernel's resident set past its ceiling; None: its peer was dropped for
        another reason, not counted here): it no longer counts in
        ``total`` and is looked at no more."""
        m.cut = True
        self.total -= m.unread
        if why is not None:
            self.counters[_UNREAD_COUNTER[why]] += 1
        return why or IN

    def largest(self) -> int | None:
        """When every connection together holds more than ``total_bytes`` unread: the descriptor
        of the one holding the most (to be cut), else None.  O(meters), only then."""
        if self.total_bytes is None or self.total <= self.total_bytes:
            return None
        live = [(m.unread, fd) for fd, m in self.meters.items() if not m.cut]
        return max(live)[1] if live else None

    def stats(self) -> dict[str, int]:
        return {**self.counters, "unread": self.total, "watched": len(self.meters), "rss_ceiling": self.rss_ceiling,
                "rss_above": self.rss_above}

    def check_invariants(self) -> None:
        assert all(m.unread >= 0 for m in self.meters.values()), "negative unread"
        assert self.total == sum(m.unread for m in self.meters.values() if not m.cut), "total disagrees"
        assert all(m.unread <= self.counters["unread_max"] for m in self.meters.values()), "unread_max too low"
