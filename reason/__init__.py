"""Symbolic reasoning helpers shared by the verified-reuse services (``scch``, ``psccr``): canonical
forms of subgoals (:mod:`reason.canon`), cheap and full verifiers (:mod:`reason.check`), the heavy
SymPy operations with a hard time bound (:mod:`reason.solve`) and generated workloads with exact
equivalence classes (:mod:`reason.workload`).

A library package like ``lm/`` and ``sims/``: pure, imports neither ``services`` nor ``clients``.
"""
