"""Shared by the services that call other services: a client to the kernel's bus
(:class:`BusService`: igms, cswif) and, for ids, rois and lot, the decode service they drive
(:class:`DecodeOrchestrator`).  Services reach each other only through the kernel."""

from __future__ import annotations

import argparse
from typing import Any

from clients.aio import AsyncClient
from kernel.config import runtime_dir
from services.base import Context, Service


class BusService(Service):
    """A service holding an :class:`AsyncClient` to the kernel (set up and closed with it).
    Calls made for a request pass ``on_behalf=ctx.principal``: the service downstream then keeps
    the state they create under the caller's principal, not under this service's."""

    #: Bound of one call through the bus, seconds.
    call_timeout = 30.0

    def __init__(self) -> None:
        self.client: AsyncClient | None = None
        self._endpoint = ""

    def configure(self, args: argparse.Namespace) -> None:
        self._endpoint = args.endpoint or f"ipc://{runtime_dir()}/kernel.sock"

    async def setup(self) -> None:
        self.client = AsyncClient(self._endpoint, timeout=self.call_timeout, retries=0)

    async def teardown(self) -> None:
        if self.client is not None:
            await self.client.close()


class DecodeOrchestrator(BusService):
    """A service that drives the ``decode`` worker through the kernel, charging the caller's job."""

    def __init__(self) -> None:
        super().__init__()
        self.decode_service = "decode"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--decode-service", default=self.decode_service)

    def configure(self, args: argparse.Namespace) -> None:
        super().configure(args)
        self.decode_service = args.decode_service

    async def _decode(self, ctx: Context, payload: dict) -> Any:
        """One request to the decode worker, charged to ``ctx``'s job; never retried (decode ops
        are not idempotent)."""
        assert self.client is not None
        return await self.client.call(self.decode_service, payload, job=ctx.job, retries=0,
                                      on_behalf=ctx.principal or None)
