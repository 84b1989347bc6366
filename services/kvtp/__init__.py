"""KVT-P — KV-cache tiering with prefetch, orchestrated through the kernel (``python -m
services.kvtp``).  See :mod:`services.kvtp.service` and docs/decode.md."""
