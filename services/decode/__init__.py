"""The decode worker: one :class:`lm.engine.Engine` served through the kernel (``python -m
services.decode``).  See :mod:`services.decode.worker` and docs/decode.md."""
