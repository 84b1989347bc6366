"""reca clients: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking).

Both speak spec-exact MDP/0.2 with reca's header, stream PARTIAL replies, raise the typed errors
of :mod:`kernel.errors`, bound every wait, and retry Lazy-Pirate style (a fresh request id, the
same idempotency key) when no reply arrives in time.
"""

from clients.core import Reply, default_endpoint
from clients.aio import AsyncClient
from clients.sync import Client

__all__ = ["AsyncClient", "Client", "Reply", "default_endpoint"]
