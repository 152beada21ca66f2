"""The paper's recipes: its learning-rate rules (linear scaling, warm-up and step decay) and its experiments as
named ``compare`` configurations (:data:`RECIPES`, ``horovod-dpsgd compare --recipe NAME``).

- Linear scaling (Goyal et al. 2017; paper Sec. 4.1): ``lr = base_lr * total_batch / base_batch``,
  e.g. 0.1 at batch 1024 gives 0.8 at batch 8192 (Table 3); it sets the peak learning rate.
- Warm-up (paper Sec. 4.2): the learning rate grows linearly from ``base_lr`` to the peak over
  ``warmup_epochs``.
- Step decay (paper Sec. 4.1): multiply by ``decay_factor`` at each epoch in ``decay_epochs``
  (CIFAR-10: 0.1 for epochs 0-159, 0.01 for 160-239, 0.001 after).
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

__all__ = ["scaled_lr", "lr_multiplier", "Recipe", "RECIPES", "get_recipe"]


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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One of the paper's experiments as a ``compare`` configuration: ``np`` learners, the train ``settings``
    shared by every run, the ``runs`` (``NAME:KEY=VALUE,...``, as ``compare --run`` takes them) and the seeds.

    ``compare --recipe NAME`` starts from it; options given on the command line override it.
    """

    name: str
    summary: str
    np: int
    settings: Mapping[str, Any]
    runs: Tuple[str, ...]
    seeds: Tuple[int, ...] = (0, 1, 2)

    def reduced(self, name: str, summary: str, seeds: Optional[Tuple[int, ...]] = None, **settings) -> "Recipe":
        """The same experiment with some settings (or the seeds) changed, e.g. fewer steps for the demo."""
        return dataclasses.replace(self, name=name, summary=summary, settings={**self.settings, **settings},
                                   seeds=self.seeds if seeds is None else seeds)


#: Settings of Sec. 2 common to 2.1 and 2.2: the 784-50-50-10 MLP on MNIST, plain SGD, nB = 2000, pixels in
#: [0, 1.5] (docs/reproduction.md, "What the result is sensitive to", says why), simulated learners. The probe of
#: the diagnostics is the whole 4 000-digit training set (``probe_batches`` x ``batch_size``), so ``g`` in Eq. 3 is
#: the gradient of the overall training loss itself, with no sampling noise of its own.
_SEC2 = dict(task="mnist", model="mlp", engine="sim", momentum=0.0, weight_decay=0.0, pixel_max=1.5, epochs=100000,
             log_every=10, eval_every=50, diag_every=25)

SEC21 = Recipe(
    "sec2.1", "Sec. 2.1: alpha = 1, n = 5, full averaging: SSGD fails, DPSGD converges, SSGD* converges worse",
    np=5, settings=dict(_SEC2, batch_size=400, probe_batches=10, lr=1.0, max_steps=3000),
    runs=("ssgd:algorithm=ssgd", "dpsgd:algorithm=dpsgd,topology=full", "ssgd*:algorithm=ssgd,noise_sigma=0.01"))

SEC22 = Recipe(
    "sec2.2", "Sec. 2.2: alpha = 0.2, n = 6, ring with 2 neighbours per side",
    np=6, settings=dict(_SEC2, batch_size=333, probe_batches=12, lr=0.2, max_steps=3000),
    runs=("ssgd:algorithm=ssgd", "dpsgd:algorithm=dpsgd,topology=ring:2", "ssgd*:algorithm=ssgd,noise_sigma=0.003"))

#: ``make demo``: the same experiments, shorter, to fit a few minutes on 2 cores (docs/reproduction.md compares
#: them with the full ones).
DEMO21 = SEC21.reduced("demo2.1", "make demo's Sec. 2.1: sec2.1 with 1000 steps", max_steps=1000)
DEMO22 = SEC22.reduced("demo2.2", "make demo's Sec. 2.2: sec2.2 with seed 0 and 1500 steps", seeds=(0,), max_steps=1500)

#: Every recipe by name.
RECIPES: Dict[str, Recipe] = {r.name: r for r in (SEC21, SEC22, DEMO21, DEMO22)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ``KeyError`` lists the names there are."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"no recipe {name!r}; recipes: {', '.join(RECIPES)}") from None
