"""IDS — interruptible decoding and splice-resume, orchestrated through the kernel (``python -m
services.ids``).  See :mod:`services.ids.service` and docs/decode.md."""
