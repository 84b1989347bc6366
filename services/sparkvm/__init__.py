"""``sparkvm``: the opcode VM of reasoning tapes (seed 003) as a reca service whose step budget
(``vm_steps``) the kernel grants, charges and caps.  :mod:`spark.vm` is the pure interpreter;
:mod:`services.sparkvm.service` the process shell.  ``python -m services.sparkvm``."""
