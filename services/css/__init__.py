"""CSS: the constraint-slack scheduler (seed 001 §3.9).  ``logic`` (constraints with units,
derivations, funding policies), ``problem`` (the shallow-water case and its actions),
``service`` (the shell)."""
