"""``python -m bench soak [--minutes N] [--quick] [--seed S]``: honest work beside hostile peers,
with random SIGKILL / SIGSTOP of services and SIGKILL of the kernel (restarted on the same
runtime directory, so it restores its enforcement state from its decision log).

Honest side: clients calling ``echo`` under a job with a budget (each call spends flops), every
call with an idempotency key and Lazy-Pirate retries.  Hostile side, in a random order: garbage
frames, oversized multi-frame messages, a peer that never reads, claims of the ROUTER's
unseeded routing ids, floods of service names and bursts of connections, and (issue 24) frames
nested deeper than the codec's cap (a request header, an ``mmi.audit`` event: each must be
answered with a typed error).  Every other kernel kill (issue 24; the first one of each run) also tears the decision log:
a partial record is appended after the SIGKILL, as a crash in the middle of a write leaves it.

Figures and targets (issue 14): peer-caused kernel aborts (0), kernel RSS maximum (<= 300 MB),
honest requests without exactly one answer (0; an answer is a result or a typed error), honest
p99 under hostile load over quiet p99 measured in the same run (<= 5), and after every kernel
restart the job's spent amounts against a replay of the log (0 mismatches), and (issue 24) the
job's spent amounts the honest clients were told before each kernel kill against those the
restarted kernel reports (0 lost), deep frames without an answer (0), and ``python -m kernel
fsck`` on the log at the end (status 0).  The p99 figures
are of honest calls that succeeded at their first attempt (a call cut by a kernel SIGKILL is
answered with a typed error or after a retry, and is counted as answered, not timed).
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import shutil
import signal
import struct
import threading
import time
from typing import Any

import msgpack
import psutil
import zmq

from bench._common import Result, percentile
from clients import Client
from clients.launch import LocalKernel, kernel_config, service_block, short_tmpdir
from kernel import errors
from kernel import protocol as P
from kernel.replay import restore

JOB = "soak"
#: headline metric -> the strongest peer it is measured against (the report's headline table)
HEADLINE = {"p99_ratio": "the quiet p99 of the same honest calls, measured in the same run without hostile peers"}
UNSEEDED_FIRST_ID = 0x6B8B4567


class Hostile:
    """The hostile peers, run in a process of their own (their Python work must not share the
    honest clients' interpreter lock, or the measurement would time the harness)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.attacks: dict[str, int] = {}
        self.deep_unanswered = 0

    def run(self, endpoint: str, stop: Any) -> dict[str, int]:
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, 8192)
        ctx.setsockopt(zmq.SNDTIMEO, 2000)  # the kernel may be down (chaos): never block for long
        attacks = [self.garbage, self.oversized, self.never_reads, self.claim_ids, self.name_flood,
                   self.connection_burst, self.deep_nesting]
        try:
            while not stop.is_set():
                attack = self.rng.choice(attacks)
                try:
                    attack(ctx, endpoint)
                except zmq.ZMQError:
                    pass  # the kernel went away under us (chaos): next attack
                self.attacks[attack.__name__] = self.attacks.get(attack.__name__, 0) + 1
        finally:
            ctx.destroy(linger=0)
        return self.attacks

    def deep_nesting(self, ctx, endpoint) -> None:
        """A reca request whose header, and an ``mmi.audit`` whose event, nest 980 deep: each is
        answered, never dropped (the audit with ``bad_request``; a header past the codec's depth
        cap is no reca header, so the request is served as an opaque MDP body)."""
        deep: Any = 1
        for _ in range(980):
            deep = [deep]
        frames = [[P.MDPC, P.ClientCmd.REQUEST.value, b"echo",
                   msgpack.packb({"v": P.VERSION, "id": 1, "x": deep}), msgpack.packb({})],
                  [P.MDPC, P.ClientCmd.REQUEST.value, P.MMI_AUDIT.encode(), msgpack.packb({"v": P.VERSION, "id": 2}),
                   msgpack.packb({"source": "x", "events": [{"e": deep}]})]]
        for message in frames:
            # A kernel killed by the chaos loop (or a connection over the peer cap during a
            # burst) answers nothing: one more try on a fresh connection after it is back.
            answered = False
            for wait_s in (5.0, 15.0):
                (s,) = self._dealers(ctx, endpoint, 1)
                s.send_multipart(message)
                answered = bool(s.poll(int(wait_s * 1000)))
                self._close([s])
                if answered:
                    break
            self.deep_unanswered += 0 if answered else 1


    def _dealers(self, ctx: zmq.Context, endpoint: str, n: int, ids=None) -> list[zmq.Socket]:
        out = []
        for i in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if ids is not None:
                s.setsockopt(zmq.ROUTING_ID, ids[i])
            s.connect(endpoint)
            out.append(s)
        return out

    @staticmethod
    def _close(socks: list[zmq.Socket]) -> None:
        for s in socks:
            s.close(0)

    def garbage(self, ctx, endpoint) -> None:
        socks = self._dealers(ctx, endpoint, 20)
        for s in socks:
            frames = [self.rng.randbytes(self.rng.randint(0, 40)) for _ in range(self.rng.randint(1, 8))]
            if self.rng.random() < 0.5:
                frames = [P.MDPC, P.ClientCmd.REQUEST.value] + frames
            s.send_multipart(frames)
        time.sleep(0.2)
        self._close(socks)

    def oversized(self, ctx, endpoint) -> None:
        (s,) = self._dealers(ctx, endpoint, 1)
        big = b"\0" * (10 << 20)
        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [big] * 10, copy=False)
        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [b"y" * (1 << 20)] * 20)
        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] + [b"z"] * 200)
        time.sleep(0.5)
        self._close([s])

    def never_reads(self, ctx, endpoint) -> None:
        (s,) = self._dealers(ctx, endpoint, 1)
        s.setsockopt(zmq.SNDHWM, 0)
        for _ in range(3000):
            s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo", b"r" * 1024])
        time.sleep(1.0)
        self._close([s])

    def claim_ids(self, ctx, endpoint) -> None:
        base = self.rng.randint(0, 5000)
        ids = [b"\x00" + struct.pack(">I", UNSEEDED_FIRST_ID + base + n) for n in range(200)]
        socks = self._dealers(ctx, endpoint, len(ids), ids)
        for s in socks:
            s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, P.MMI_SERVICE.encode(), b"echo"])
        time.sleep(0.5)
        self._close(socks)

    def name_flood(self, ctx, endpoint) -> None:
        (s,) = self._dealers(ctx, endpoint, 1)
        tag = self.rng.randrange(1 << 30)
        for n in range(2000):
            s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, f"flood{tag}.{n}".encode(), b"x"])
            if n % 200 == 199:
                while s.poll(0):
                    s.recv_multipart()
        time.sleep(0.3)
        self._close([s])

    def connection_burst(self, ctx, endpoint) -> None:
        socks = self._dealers(ctx, endpoint, 1000)
        time.sleep(0.5)
        self._close(socks)


def _hostile_main(endpoint: str, seed: int, stop: Any, out: Any) -> None:
    h = Hostile(seed)
    attacks = h.run(endpoint, stop)
    out.put({**attacks, "deep_unanswered": h.deep_unanswered})


class Soak:
    def __init__(self, seed: int, hostile_s: float, quiet_calls: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.honest_threads = 2
        self.hostile_s = hostile_s
        self.quiet_calls = quiet_calls
        self.dir = short_tmpdir("reca-soak-")
        self.config = kernel_config(service_block("echo", "services.echo", replicas=2), heartbeat=1.0,
                                    liveness=3, unavailable_wait=2.0, intensity=50, period=10.0)
        self.kernel: LocalKernel | None = None
        self.expected_exits = 0
        self.aborts = 0
        self.restarts = 0
        self.rss_max = 0.0
        self.mismatches = 0
        self.state_lost = 0  # kernel kills after which a job's spent amounts differ from before
        self.torn = 0
        self.deep_unanswered = 0
        self.fsck_status: int | None = None
        self.lock = threading.Lock()
        self.quiet: list[float] = []
        self.loud: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.messages: dict[str, str] = {}  # error code -> the first message seen with it
        self.unanswered = 0
        self.stop = threading.Event()
        self.pause = threading.Event()  # honest clients hold still while a restart is checked
        self.idle = threading.Semaphore(0)
        self.attacks: dict[str, int] = {}
        self.chaos: dict[str, int] = {}

    # -- kernel ------------------------------------------------------------------------------------

    def start_kernel(self) -> None:
        self.kernel = LocalKernel(self.config, runtime_dir=self.dir)
        with Client(self.kernel.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 30)

    def kernel_alive_check(self) -> None:
        k = self.kernel
        if k is not None and k.proc.poll() is not None:
            rc = k.proc.returncode
            if rc == -signal.SIGKILL and self.expected_exits:
                return
            self.aborts += 1  # it died and nobody here killed it
            k.stop()
            self.start_kernel()

    def sample_rss(self) -> None:
        while not self.stop.is_set():
            k = self.kernel
            try:
                rss = psutil.Process(k.pid).memory_info().rss / 1e6 if k else 0.0
            except psutil.Error:
                rss = 0.0
            self.rss_max = max(self.rss_max, rss)
            self.stop.wait(0.2)

    # -- honest side -------------------------------------------------------------------------------

    def honest(self, n: int | None, into: list[float]) -> None:
        calls = 0
        while not self.stop.is_set() and (n is None or calls < n):
            if self.pause.is_set():
                self.idle.release()
                while self.pause.is_set() and not self.stop.is_set():
                    time.sleep(0.01)
                continue
            k = self.kernel
            assert k is not None
            with Client(k.endpoint, timeout=5, retries=2) as c:
                for _ in range(20):
                    if self.stop.is_set() or self.pause.is_set() or (n is not None and calls >= n):
                        break
                    calls += 1
                    t0 = time.perf_counter()
                    code = "ok"
                    try:
                        c.call("echo", {"steps": 1, "step_ms": 0}, job=JOB, retries=0)
                        into.append(time.perf_counter() - t0)
                    except errors.RecaError as exc:
                        code = str(getattr(exc.code, "value", exc.code))
                        self.messages.setdefault(code, exc.message)
                        if exc.retryable:  # one retry with the same idempotency key
                            try:
                                c.call("echo", {"steps": 1, "step_ms": 0}, job=JOB)
                                code += "+retried_ok"
                            except errors.RecaError as again:
                                code += "+" + str(getattr(again.code, "value", again.code))
                    except Exception:  # anything but a typed answer is a violation
                        code = "unanswered"
                    with self.lock:
                        self.outcomes[code] = self.outcomes.get(code, 0) + 1
                        if code == "unanswered":
                            self.unanswered += 1

    # -- chaos -------------------------------------------------------------------------------------

    def chaos_loop(self, every_s: float) -> None:
        while not self.stop.wait(self.rng.uniform(0.5, 1.5) * every_s):
            k = self.kernel
            if k is None:
                continue
            kids = [p for p in k.descendants() if "services.echo" in " ".join(p.cmdline() or [])] \
                if k.proc.poll() is None else []
            # Every run restores at least once (the first chaos event kills the kernel).
            what = self.rng.choice(["kill_service", "stop_service", "kill_kernel"]) if self.chaos else "kill_kernel"
            self.chaos[what] = self.chaos.get(what, 0) + 1
            if what == "kill_service" and kids:
                self.rng.choice(kids).send_signal(signal.SIGKILL)
            elif what == "stop_service" and kids:
                victim = self.rng.choice(kids)
                victim.send_signal(signal.SIGSTOP)
                self.stop.wait(self.rng.uniform(0.5, 3.0))
                try:
                    victim.send_signal(signal.SIGCONT)
                except psutil.Error:
                    pass
            elif what == "kill_kernel":
                self.restart_kernel()

    def _told(self) -> dict | None:
        """The job's spent amounts as the kernel reports them now (wall time aside: it runs on)."""
        k = self.kernel
        assert k is not None
        try:
            with Client(k.endpoint, timeout=10, retries=0) as c:
                spent = c.mmi(P.MMI_JOB_STATS, {"job": JOB})["spent"]
        except errors.RecaError:
            return None
        return {kk: v for kk, v in spent.items() if kk != "wall_ms"}

    def restart_kernel(self) -> None:
        k = self.kernel
        assert k is not None
        self.pause.set()
        # The honest clients finish (answer or typed error) their calls and hold still, so what
        # they were told before the kill is a quiescent state to compare the restored one with.
        for _ in range(self.honest_threads):
            self.idle.acquire(timeout=60)
        before = self._told()
        self.expected_exits += 1
        k.kill()
        if self.restarts % 2 == 0:  # every other kill: a crash in the middle of a write, a torn record
            with open(k.decision_log, "ab") as fh:
                fh.write(b'{"seq":' + str(self.rng.randrange(1 << 30)).encode() + b',"op":"char')
            self.torn += 1
        self.start_kernel()
        self.restarts += 1
        after = self._told()
        if before is not None and after != before:
            self.state_lost += 1
        self.check_replay()
        self.pause.clear()

    def check_replay(self) -> None:
        """The restored job's spent amounts against a replay of the log at this moment."""
        k = self.kernel
        assert k is not None
        with Client(k.endpoint, timeout=10, retries=0) as c:
            live = c.mmi(P.MMI_JOB_STATS, {"job": JOB})
            report = restore(k.decision_log)
        replayed = report.ledger.snapshot(time.monotonic()).get(JOB) if report and report.ledger else None
        if replayed is None or {kk: v for kk, v in live["spent"].items() if kk != "wall_ms"} != \
                {kk: v for kk, v in replayed["spent"].items() if kk != "wall_ms"}:
            self.mismatches += 1

    # -- the run -----------------------------------------------------------------------------------

    def run(self, chaos_every_s: float) -> None:
        self.start_kernel()
        with Client(self.kernel.endpoint, timeout=10, retries=0) as c:
            c.open_job(JOB, {"flops": 1e12})
        sampler = threading.Thread(target=self.sample_rss, daemon=True)
        sampler.start()
        self.honest(self.quiet_calls, self.quiet)  # quiet phase: nothing hostile yet
        threads = [threading.Thread(target=self.honest, args=(None, self.loud)) for _ in range(self.honest_threads)]
        threads.append(threading.Thread(target=self.chaos_loop, args=(chaos_every_s,)))
        mp = multiprocessing.get_context("spawn")
        hostile_stop, hostile_out = mp.Event(), mp.Queue()
        hostile = mp.Process(target=_hostile_main, args=(self.kernel.endpoint, self.seed, hostile_stop,
                                                         hostile_out))
        hostile.start()
        for t in threads:
            t.start()
        end = time.monotonic() + self.hostile_s
        while time.monotonic() < end:
            time.sleep(0.5)
            if not self.pause.is_set():
                self.kernel_alive_check()
        self.stop.set()
        hostile_stop.set()
        try:
            self.attacks = hostile_out.get(timeout=120)
            self.deep_unanswered = self.attacks.pop("deep_unanswered", 0)
        except queue.Empty:
            pass
        hostile.join(30)
        if hostile.is_alive():
            hostile.kill()
        for t in threads:
            t.join(120)
        self.kernel_alive_check()
        if self.kernel is not None:
            self.kernel.stop()
            from kernel.fsck import check

            self.fsck_status = check(self.kernel.decision_log, repair=False, discard=False, out=lambda line: None)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(quick: bool = False, minutes: float | None = None, seed: int = 14) -> Result:
    hostile_s = 60.0 * minutes if minutes else (30.0 if quick else 600.0)
    s = Soak(seed, hostile_s, quiet_calls=300 if quick else 1000)
    s.run(chaos_every_s=6.0 if hostile_s < 120 else 20.0)
    quiet_p99 = percentile(s.quiet, 99) * 1e3
    loud_p99 = percentile(s.loud, 99) * 1e3
    answered = sum(s.outcomes.values())
    metrics = {
        "peer_caused_aborts": float(s.aborts),
        "kernel_rss_max_mb": s.rss_max,
        "honest_requests": float(answered),
        "honest_unanswered": float(s.unanswered),
        "quiet_p99_ms": quiet_p99,
        "hostile_p99_ms": loud_p99,
        "p99_ratio": loud_p99 / quiet_p99 if quiet_p99 > 0 else float("inf"),
        "kernel_restarts": float(s.restarts),
        "replay_mismatches": float(s.mismatches),
        "state_lost_after_restart": float(s.state_lost),
        "torn_log_restarts": float(s.torn),
        "deep_frames_unanswered": float(s.deep_unanswered),
        "fsck_status": float(s.fsck_status if s.fsck_status is not None else 9),
        "hostile_s": hostile_s,
    }
    table = [{"outcome": k, "count": v} for k, v in sorted(s.outcomes.items())]
    table += [{"outcome": f"attack:{k}", "count": v} for k, v in sorted(s.attacks.items())]
    table += [{"outcome": f"chaos:{k}", "count": v} for k, v in sorted(s.chaos.items())]
    return Result(
        metrics=metrics,
        targets={"peer_caused_aborts": ("<=", 0), "kernel_rss_max_mb": ("<=", 300), "honest_unanswered": ("<=", 0),
                 "p99_ratio": ("<=", 5), "replay_mismatches": ("<=", 0), "state_lost_after_restart": ("<=", 0),
                 "deep_frames_unanswered": ("<=", 0), "fsck_status": ("<=", 0)},
        table=table,
        samples={"quiet_p99_ms": len(s.quiet), "hostile_p99_ms": len(s.loud), "p99_ratio": min(len(s.quiet), len(s.loud))},
        notes=[f"{code}: {msg}" for code, msg in sorted(s.messages.items())] + [f"seed {seed}; {len(s.quiet)} quiet and {len(s.loud)} hostile-phase first-attempt successes timed",
               "machine shared with other agents (2 cores): latency figures measured under that contention"],
    )
