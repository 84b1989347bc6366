"""Compute-Safe Two-Phase What-If (seed 001 §3.12) as a service.

:mod:`services.cswif.logic` is the pure part; :mod:`services.cswif.service` the process shell.
``python -m services.cswif [--threshold T]``.
"""
