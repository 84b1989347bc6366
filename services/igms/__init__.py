"""Invariant-Gated Multi-Fidelity Simulation as a service (seed 001 §3.4).

:mod:`services.igms.logic` is the pure part; :mod:`services.igms.service` the process shell.
``python -m services.igms``.
"""
