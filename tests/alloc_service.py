"""A service for the memory-ceiling tests: ``{"alloc_mb": n}`` allocates and touches n MiB (a
request that ignores its ``mem_bytes`` grant), then answers ``{"allocated_mb": n}``."""

from __future__ import annotations

from typing import Any

from services.base import Context, Service, main


class Alloc(Service):
    name = "alloc"

    async def handle(self, ctx: Context, payload: Any) -> Any:
        n = int(payload.get("alloc_mb", 0)) if isinstance(payload, dict) else 0
        blocks = []
        for _ in range(n):
            blocks.append(bytearray(b"\x01" * (1 << 20)))  # touched: resident, not just reserved
        return {"allocated_mb": len(blocks)}


if __name__ == "__main__":
    raise SystemExit(main(Alloc()))
