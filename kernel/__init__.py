"""The reca microkernel: routing (MDP/0.2), budgets, gates, preemption and supervision.

Its public API for services and clients: :mod:`kernel.protocol` (wire constants),
:mod:`kernel.codec` (the one msgpack codec), :mod:`kernel.errors` (typed errors),
:mod:`kernel.aio` (asyncio readiness for ZeroMQ sockets) and :mod:`kernel.config`.  The kernel
imports no service, and neither torch nor cupy, so it starts fast.
"""
