"""SPARK (seed 003) as reca workloads: the opcode VM of reasoning tapes whose step budget the
kernel enforces, codebook ("demopack") weights with a fused decode + GEMM, and the comparisons
of docs/spark.md.  Each part is measured against the dense or learned thing it replaces
(``python -m bench spark``)."""
