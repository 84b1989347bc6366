"""SCCH — the subgoal cache with canonical hashing (``python -m services.scch``).
See :mod:`services.scch.service`, :mod:`services.scch.logic` and docs/caches.md."""
