"""ResNet-BK language-model training as a reca job (issue 19).

:mod:`bklm` is the pure part (model, trainer, checkpoints); :mod:`services.bktrain.service` the
process shell: each step's FLOPs and ACT ponder steps are charged to the caller's job as they
happen, a safe point between steps lets the kernel preempt, resume and cancel, and the kernel
stops the run when the job's ``flops`` run out. ``python -m services.bktrain``.
"""
