"""Control traffic by authority (issue 24): which control topics a principal may subscribe to.

The kernel's control socket is an XPUB with manual subscriptions: a subscription a peer sends is
applied only when :func:`may_subscribe` allows it for the peer's verified principal, so a
service key receives the control topics of its own services (``ctl/<service>/...``, its
per-worker names ``ctl/<service>@<k>/...``, and the broadcasts on ``ctl/all/``, which carry no
job names: kernel.router.Router.order sends an order naming a job only to the services holding its
requests) and a client none.  Operators (and every ``ipc://`` peer, which is the local operator) may subscribe to any.
A subscription is a byte prefix, so one that is a prefix of another principal's topics
(``ctl/``, ``ctl/tt``, the empty one) is refused: it must start with an allowed prefix.

Pure (no sockets); kernel.server applies it.
"""

from __future__ import annotations

from kernel import protocol as P
from kernel.principal import Principal


def allowed_prefixes(principal: Principal) -> tuple[bytes, ...] | None:
    """The topic prefixes ``principal`` may subscribe under; None: every topic (an operator)."""
    if principal.operator:
        return None
    out: list[bytes] = []
    for service in principal.services:
        out.append(f"{P.CTL_PREFIX}{service}/".encode())
        out.append(f"{P.CTL_PREFIX}{service}@".encode())
    if out:
        out.append(f"{P.CTL_PREFIX}{P.CTL_ALL}/".encode())
    return tuple(out)


def may_subscribe(principal: Principal, topic: bytes) -> bool:
    """Whether ``principal`` may subscribe to the prefix ``topic`` (module docstring)."""
    prefixes = allowed_prefixes(principal)
    if prefixes is None:
        return True
    return any(topic.startswith(p) for p in prefixes)
