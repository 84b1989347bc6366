"""reca clients: :class:`AsyncClient` (anyio: asyncio or trio) and :class:`Client` (blocking).

Both speak spec-exact MDP/0.2 with reca's header, stream PARTIAL replies, raise the typed errors
of :mod:`kernel.errors`, bound every wait, and retry Lazy-Pirate style (a fresh request id, the
same idempotency key) when no reply arrives in time.  On first contact they fail at once, naming
the endpoint or the certificate, when no kernel can be reached (:class:`ConnectError`).
"""

from clients.core import ConnectError, Reply, default_endpoint
from clients.aio import AsyncClient
from clients.sync import Client

__all__ = ["AsyncClient", "Client", "ConnectError", "Reply", "default_endpoint"]
