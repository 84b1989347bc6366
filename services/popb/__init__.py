"""POPB — the per-operator precision budgeter (``python -m services.popb``).  See
:mod:`services.popb.service` and docs/decode.md."""
