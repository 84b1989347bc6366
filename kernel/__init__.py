"""The reca microkernel: routing (MDP/0.2), budgets, gates, preemption and supervision.

Its public API for services and clients: :mod:`kernel.protocol` (wire constants),
:mod:`kernel.codec` (the one msgpack codec), :mod:`kernel.errors` (typed errors),
:mod:`kernel.aio` (asyncio readiness for ZeroMQ sockets) and :mod:`kernel.config`.  The kernel
imports no service, and neither torch nor cupy, so it starts fast.
"""

import os as _os

# Opt-in compiled core (./dev build): RECA_COMPILED=<dir> puts the mypyc build in <dir> first on
# this package's path after checking it against the sources; a stale build raises ImportError.
if _os.environ.get("RECA_COMPILED"):
    from kernel._compiled import activate as _activate

    _activate(_os.environ["RECA_COMPILED"], __path__)
