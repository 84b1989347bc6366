"""The kernel's ZAP handler (imported by the kernel only: pyzmq's thread authenticator pulls in
asyncio, which clients need not pay for at import)."""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kernel.auth import ZAP_DOMAIN_CONTROL, ZAP_DOMAIN_ROUTER, Principals

log = logging.getLogger("reca.auth")


class ZapHandler(ThreadAuthenticator):
    """pyzmq's ZAP authenticator (a thread of the kernel), with the kernel's principals as the
    CURVE credentials: a known key is accepted and its user id is the principal's name; the
    control PUB accepts operators and services only."""

    def __init__(self, context: zmq.Context, principals: Principals) -> None:
        super().__init__(context, log=logging.getLogger("reca.zap"))
        self.principals = principals
        self.refused = 0  # handshakes refused (read by the kernel's stats)

    def callback(self, domain: str, key: bytes) -> bool:
        p = self.principals.by_key(key)
        ok = p is not None and (domain != ZAP_DOMAIN_CONTROL or p.operator or bool(p.services))
        if not ok:
            self.refused += 1
            log.warning("ZAP refused a CURVE handshake on %s: %s", domain,
                        "unknown key" if p is None else f"{p.name} ({p.role}) may not subscribe to control")
        return ok

    def curve_user_id(self, client_public_key: bytes) -> str:
        p = self.principals.by_key(zmq.utils.z85.encode(client_public_key))
        return p.name if p is not None else ""

    def start(self) -> None:
        super().start()
        for domain in (ZAP_DOMAIN_ROUTER, ZAP_DOMAIN_CONTROL):
            self.configure_curve_callback(domain, credentials_provider=self)
