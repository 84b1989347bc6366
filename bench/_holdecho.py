"""``python -m bench._holdecho``: the echo service (services/echo.py) plus one behaviour that
``bench ray``'s wall-budget overshoot rounds need.

* ``{"hold_ms": t, "release": path}`` -- one busy step that ignores its cancel until the file
  ``path`` exists (or ``t`` ms have passed, a cap), then a safe point (where a cancel is answered).

The echo's own ``steps``/``step_ms`` step ignores its cancel for a fixed time, which must outlast
the slowest stop a round may see (a Ray-placed worker is frozen only once the node's CPU reading,
polled every ``kernel.rayplace.CPU_POLL_S``, shows it burning): every round then costs that whole
step.  Here the bench ends the step as soon as it has seen the stop and thawed the worker (it
creates ``path``: same host, or a file system both see), so a round costs what it measures plus the
answer.  The step's cap bounds a round whose stop never lands.  Everything else is the echo's.
"""

from __future__ import annotations

import os
import time
from typing import Any

from services.base import Context, main
from services.echo import Echo

#: Longest a held step runs (seconds), whatever ``hold_ms`` asks.
HOLD_CAP_S = 60.0


class HoldEcho(Echo):
    name = "holdecho"

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if not (isinstance(payload, dict) and "release" in payload):
            return await super().handle(ctx, payload)
        release = str(payload["release"])
        deadline = time.monotonic() + min(float(payload.get("hold_ms", 1000.0)) / 1000.0, HOLD_CAP_S)
        await ctx.checkpoint()
        spin = 0
        while time.monotonic() < deadline and not os.path.exists(release):  # busy, deaf to the cancel
            for _ in range(200):
                spin = (spin * 31 + 7) % 1_000_003
        await ctx.checkpoint()  # the cancel it held is answered here
        return {"released": os.path.exists(release), "spin": spin}


if __name__ == "__main__":
    raise SystemExit(main(HoldEcho()))
