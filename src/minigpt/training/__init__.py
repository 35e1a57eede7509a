"""Training: run set-up and resume policy (setup.py), the loop (trainer.py), optimizers (optim.py),
the non-finite step guard (nonfinite.py), data parallelism (distributed.py) and stop signals
(signals.py). `train()` lives in run.py; `minigpt.train` is the public name for it.

This package is `training`, not `train`, so that it never hides the public function `minigpt.train`
(importing a sub-package sets an attribute of that name on its parent).
"""
