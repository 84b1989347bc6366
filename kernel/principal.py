"""Principals: who a peer is, as the kernel has verified it (kernel.auth does the verifying).

Pure data: the router, the admission and the management calls read a message's principal; only
kernel.auth (CURVE, ZAP, key files) makes them from certificates.  The roles are the table
:data:`kernel.protocol.ROLES`.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from kernel import protocol as P

OPERATOR: Final = P.Role.OPERATOR.value
CLIENT: Final = P.Role.CLIENT.value
SERVICE_PREFIX: Final = P.SERVICE_ROLE_PREFIX
#: Role the kernel gives a connection whose key is no longer in its table (revoked while connected).
REVOKED: Final = P.Role.REVOKED.value
#: Role of the kernel's own key pair in a key directory (never a peer principal).
KERNEL_ROLE: Final = P.Role.KERNEL.value
#: Name prefix of the principals the supervisor makes for its children (``child:NAME``).
CHILD_PREFIX: Final = "child:"

__all__ = [
    "CHILD_PREFIX",
    "CLIENT",
    "KERNEL_ROLE",
    "LOCAL_OPERATOR",
    "OPERATOR",
    "REVOKED",
    "SERVICE_PREFIX",
    "Principal",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """A verified peer: its name (the ZAP user id) and its role text (a :class:`P.Role` value,
    or ``service:NAME[,NAME...]``)."""

    name: str
    role: str

    @property
    def kind(self) -> P.Role:
        """The role's row of the roles table."""
        return P.role_kind(self.role)

    @property
    def operator(self) -> bool:
        return self.role == OPERATOR

    @property
    def revoked(self) -> bool:
        return self.role == REVOKED

    @property
    def services(self) -> tuple[str, ...]:
        """The services this principal may register for (and audit as)."""
        if self.role.startswith(SERVICE_PREFIX):
            return tuple(self.role[len(SERVICE_PREFIX) :].split(","))
        return ()

    @property
    def child(self) -> str | None:
        """The supervised child this principal is (``child:NAME``), None for any other."""
        return self.name[len(CHILD_PREFIX) :] if self.name.startswith(CHILD_PREFIX) else None

    def may_serve(self, service: str) -> bool:
        """Operators serve anything; ``service:NAME`` serves ``NAME`` and its per-worker names
        ``NAME@...`` (a sim worker's ``sim@<pid>``)."""
        if self.operator:
            return True
        return any(service == s or service.startswith(s + "@") for s in self.services)

    def may_audit(self, source: str) -> bool:
        return self.operator or source in self.services


#: Every peer of an ``ipc://`` kernel (its runtime directory is private) and of an insecure one.
LOCAL_OPERATOR: Final = Principal("local", OPERATOR)
