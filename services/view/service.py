"""The ``view`` service's shell: an aiohttp server, a poller of ``mmi.stats`` and a listener on
the control bus, feeding :class:`services.view.model.ViewModel` (which decides everything shown).

Access: every HTTP request needs the service's token (``?token=`` once, then a same-site,
HTTP-only cookie), written with the page's URL to ``{runtime}/view.url`` (mode 0600).  The
server listens on 127.0.0.1 unless ``--http`` says otherwise; on any address the token is
required, so the page is never open without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import time
from importlib import resources
from typing import Any

import zmq
from aiohttp import web

from clients.aio import AsyncClient
from kernel import auth, codec
from kernel import protocol as P
from kernel.aio import Readable, recv_frames
from kernel.config import default_control_for, runtime_dir
from services.base import Context, Service
from services.view.model import ViewModel

log = logging.getLogger("reca.view")

#: Pages of jobs (``P.STATS_PAGE`` each) the view reads per poll; the page draws 500 rows and
#: counts the rest from ``summary.jobs``.
VIEW_JOB_PAGES = 6

COOKIE = "reca_view"
#: Seconds between two polls of mmi.stats, and the bound on one poll.
POLL_S = 0.5
POLL_TIMEOUT_S = 5.0
#: An SSE keep-alive comment after this much silence, seconds.
KEEPALIVE_S = 15.0


def parse_http(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"--http must be HOST:PORT, got {text!r}")
    return host, int(port)


class ViewService(Service):
    name = "view"
    capacity = 4

    def __init__(self) -> None:
        self.http: tuple[str, int] = ("127.0.0.1", 0)
        self.poll_s = POLL_S
        self.endpoint = ""
        self.control: str | None = None
        self.url_file = ""
        self.decision_log = ""
        self.operator_cert: str | None = None
        self.token = secrets.token_urlsafe(24)
        self.url = ""
        self.model = ViewModel()
        self.client: AsyncClient | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()
        self.viewers = 0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--http",
            type=parse_http,
            default=self.http,
            help="HOST:PORT the page is served on (default 127.0.0.1:0, a free port)",
        )
        parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between two polls of the kernel")
        parser.add_argument(
            "--operator-cert",
            default=None,
            help="over tcp://: an operator's secret certificate the view polls with, so it sees every "
            "job (default: its own service certificate, which sees only its own)",
        )
        parser.add_argument(
            "--url-file", default=None, help="where the page's URL is written (default {runtime}/view.url, mode 0600)"
        )
        parser.add_argument(
            "--decision-log",
            default=None,
            help="the kernel's decision log, read for the cpcs Gantt chart (default {runtime}/decisions.jsonl)",
        )

    def configure(self, args: argparse.Namespace) -> None:
        self.http = args.http
        self.poll_s = args.poll
        self.operator_cert = args.operator_cert
        self.endpoint = args.endpoint or f"ipc://{runtime_dir()}/kernel.sock"
        self.control = args.control or default_control_for(self.endpoint)
        base = os.path.dirname(self.endpoint[len("ipc://") :]) if self.endpoint.startswith("ipc://") else runtime_dir()
        self.url_file = args.url_file or os.path.join(base, "view.url")
        self.decision_log = args.decision_log or os.path.join(base, "decisions.jsonl")

    # -- lifetime ---------------------------------------------------------------------------------

    async def setup(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/state", self.state)
        app.router.add_get("/events", self.events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http[0], self.http[1])
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/"
        tmp = f"{self.url_file}.{os.getpid()}.tmp"
        auth.write_private(tmp, f"{self.url}?token={self.token}\n".encode())
        os.replace(tmp, self.url_file)
        print(f"reca view serving {self.url} (token in {self.url_file})", flush=True)
        self.client = AsyncClient(self.endpoint, timeout=POLL_TIMEOUT_S, retries=0, cert=self.operator_cert)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll()),
            loop.create_task(self._listen()),
            loop.create_task(self._tail_log()),
        ]

    async def teardown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self.client is not None:
            await self.client.close()
        with contextlib.suppress(OSError):
            os.unlink(self.url_file)

    async def handle(self, ctx: Context, payload: Any) -> Any:
        """Where the page is (without its token) and how many watch it."""
        return {"url": self.url, "viewers": self.viewers, "token_file": self.url_file}

    # -- feeding the model ------------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _poll(self) -> None:
        assert self.client is not None
        while True:
            try:
                stats = await self.client.stats()
                # mmi.stats holds one page of jobs (issue 24: its cost is a page); the page draws
                # up to VIEW_JOB_PAGES of them, read a page at a time, and counts the rest
                pages = min(int((stats.get("summary") or {}).get("jobs_pages") or 1), VIEW_JOB_PAGES)
                for page in range(1, pages):
                    stats.setdefault("jobs", {}).update(await self.client.call(P.MMI_JOB_STATS, {"page": page}))
            except Exception as exc:  # the kernel restarting, a slow answer: the next poll retries
                log.warning("view: mmi.stats failed: %s", exc)
            else:
                self.model.on_stats(stats, time.time())
                self._notify()
            await asyncio.sleep(self.poll_s)

    async def _tail_log(self) -> None:
        """cpcs's audit records from the decision log (followed across segment rotation)."""
        from kernel.replay import Follower

        follower = None
        try:
            while True:
                if follower is None and os.path.exists(self.decision_log):
                    follower = Follower(self.decision_log)
                if follower is not None:
                    changed = False
                    for rec in follower.read():
                        changed |= self.model.on_log_record(rec, time.time())
                    if changed:
                        self._notify()
                await asyncio.sleep(self.poll_s)
        finally:
            if follower is not None:
                follower.close()

    async def _listen(self) -> None:
        """Every preempt / resume / cancel published on the control bus."""
        if not self.control:
            return
        ctx = zmq.Context.instance()
        sub = auth.secure_socket(ctx, zmq.SUB, self.control, auth.peer_credentials())
        sub.setsockopt(zmq.SUBSCRIBE, P.CTL_PREFIX.encode())
        sub.connect(self.control)
        readable = Readable(sub)
        try:
            while True:
                await readable.wait()
                while True:
                    try:
                        frames = recv_frames(sub)
                    except zmq.Again:
                        break
                    if len(frames) != 2:
                        continue
                    try:
                        message = codec.unpack(frames[1])
                    except Exception:
                        continue
                    self.model.on_control(frames[0].decode(errors="replace"), message, time.time())
                    self._notify()
        finally:
            readable.close()
            sub.close(0)

    # -- HTTP -------------------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        given = request.query.get("token") or request.cookies.get(COOKIE) or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _denied(self) -> web.Response:
        return web.Response(
            status=401,
            text=f"reca view: this page needs its token; the URL with it is in "
            f"{self.url_file} (python -m clients view)\n",
        )

    async def page(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._denied()
        html = resources.files("services.view").joinpath("page.html").read_text(encoding="utf-8")
        resp = web.Response(text=html, content_type="text/html")
        resp.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return resp

    async def state(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._denied()
        return web.json_response(self.model.state(), dumps=lambda v: json.dumps(v, default=str))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The state as server-sent events: one ``data:`` line of JSON per change."""
        if not self._authorised(request):
            return self._denied()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.viewers += 1
        try:
            seen = -1
            while True:
                changed = self._changed
                if self.model.version != seen:
                    seen = self.model.version
                    await resp.write(f"data: {json.dumps(self.model.state(), default=str)}\n\n".encode())
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:  # the browser went away
            pass
        finally:
            self.viewers -= 1
        return resp
