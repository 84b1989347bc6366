"""A ResNet-BK language model (seed 002) on reca's exact O(N) causal BK-core, its six cost-saving
techniques as switchable parts, a same-size Transformer baseline, and a checkpointed trainer.

* :mod:`bklm.corpus` — the Python stdlib's own source as a code corpus, split by module;
* :mod:`bklm.model` — ResNet-BK (causal BK-core mixing, MoE feed-forward, residual blocks) with
  ACT, multi-scale and learned sparsity; the Transformer baseline; exact FLOP counting;
* :mod:`bklm.train` — the trainer: curriculum, active learning, gradient caching, evaluation,
  checkpoints that restore a run bit for bit;
* :mod:`bklm.errors` — typed errors.

Library code: never imports services/, clients/ or bench/ (the ``bktrain`` service drives it).
"""
