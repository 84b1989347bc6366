"""The simulation worker: runs a :mod:`sims` case step by step under the kernel.

:mod:`services.sim.logic` is the pure part (parsing, run state, fidelity orders, wire records);
:mod:`services.sim.service` is the process shell.  ``python -m services.sim``.
"""
