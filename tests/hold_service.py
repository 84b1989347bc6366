"""A service for the ladder's tests: a request that holds its slot with no safe point, either
waiting (``{"sleep_ms": n}``: a blocking sleep, no CPU) or spinning (``{"spin_ms": n}``: a busy
loop); answers ``{"held_ms": n}``."""

from __future__ import annotations

import time
from typing import Any

from services.base import Context, Service, main


class Hold(Service):
    name = "hold"

    async def handle(self, ctx: Context, payload: Any) -> Any:
        payload = payload if isinstance(payload, dict) else {}
        if "sleep_ms" in payload:
            time.sleep(float(payload["sleep_ms"]) / 1000.0)  # blocks the event loop: ignores every cancel
            return {"held_ms": payload["sleep_ms"]}
        deadline = time.monotonic() + float(payload.get("spin_ms", 0)) / 1000.0
        spin = 0
        while time.monotonic() < deadline:
            spin = (spin * 31 + 7) % 1_000_003
        return {"held_ms": payload.get("spin_ms", 0)}


if __name__ == "__main__":
    raise SystemExit(main(Hold()))
