"""The paper's learning-rate recipes: linear scaling, warm-up and step decay.

- Linear scaling (Goyal et al. 2017; paper Sec. 4.1): ``lr = base_lr * total_batch / base_batch``,
  e.g. 0.1 at batch 1024 gives 0.8 at batch 8192 (Table 3); it sets the peak learning rate.
- Warm-up (paper Sec. 4.2): the learning rate grows linearly from ``base_lr`` to the peak over
  ``warmup_epochs``.
- Step decay (paper Sec. 4.1): multiply by ``decay_factor`` at each epoch in ``decay_epochs``
  (CIFAR-10: 0.1 for epochs 0-159, 0.01 for 160-239, 0.001 after).
"""

from typing import Callable, Sequence

__all__ = ["scaled_lr", "lr_multiplier"]


def scaled_lr(base_lr: float, total_batch: int, base_batch: int, linear_scaling: bool) -> float:
    """The peak learning rate: ``base_lr`` scaled linearly by ``total_batch / base_batch`` if asked."""
    if base_lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {base_lr}")
    return base_lr * total_batch / base_batch if linear_scaling else base_lr


def lr_multiplier(steps_per_epoch: int, start_fraction: float = 1.0, warmup_epochs: float = 0.0,
                  decay_epochs: Sequence[float] = (), decay_factor: float = 0.1) -> Callable[[int], float]:
    """A ``step -> multiplier of the peak lr`` function for ``torch.optim.lr_scheduler.LambdaLR``.

    During warm-up the multiplier goes linearly from ``start_fraction`` (``base_lr / peak``) to 1.
    """
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1 (is the dataset smaller than one batch per learner?)")
    warmup_steps = warmup_epochs * steps_per_epoch
    milestones = sorted(e * steps_per_epoch for e in decay_epochs)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return start_fraction + (1.0 - start_fraction) * step / warmup_steps
        return decay_factor ** sum(step >= m for m in milestones)

    return multiplier
