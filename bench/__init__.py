"""Benchmarks: ``python -m bench NAME [--quick] [--json PATH]``.

Each benchmark is a module ``bench/<name>.py`` exposing ``run(quick: bool) -> Result``.
Speed and memory are measured here, never asserted in tests.
"""
