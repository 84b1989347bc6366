"""PSC-CR — proof-state checkpointing and cousin-branch reuse (``python -m services.psccr``).
See :mod:`services.psccr.logic` and docs/caches.md."""
