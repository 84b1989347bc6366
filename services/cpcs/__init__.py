"""CPCS: the critical-path compute scheduler (seed 001 §3.1).  ``dag`` (validation), ``logic``
(the pure scheduler), ``service`` (the shell), ``work`` (the worker processes it places tasks on),
``gantt`` (charts from its decision events)."""
