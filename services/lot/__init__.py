"""Lazy-of-Thought — force only the thunks a consumer demands, in place, through the decode worker
(``python -m services.lot``).  See :mod:`services.lot.service` and docs/decode.md."""
