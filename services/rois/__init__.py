"""RoI-S — verifier-driven span repair through the decode worker (``python -m services.rois``).
See :mod:`services.rois.service` and docs/decode.md."""
