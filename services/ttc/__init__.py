"""Transactional Tool Calls (seed 001 §3.5): prepare / commit / abort of heavy tool runs over a
durable SQLite log, so a plan change aborts work before it runs, no heavy run is orphaned and no
committed result is lost.

``logic`` is the pure state machine, ``store`` the log, ``tools`` the tool registry and adapters,
``runner`` the OS-limited worker processes and the coordinator, ``checker`` the independent
invariant checker.  docs/ttc.md describes the protocol and its guarantees.
"""
