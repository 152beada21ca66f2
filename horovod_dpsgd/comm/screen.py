"""Non-finite weights kept out of the mix (``nonfinite="raise"`` or ``"skip"``).

Mixing is an average: one learner's NaN or infinite weights would reach each of its neighbours at the next
step and, a few steps later, every learner. So before a learner mixes, it checks the weights it received with
one reduction per buffer (a sum, in at least float32: a NaN or infinity anywhere makes it non-finite) and one
host synchronisation for all of them; a sum that overflows although every element is finite is confirmed
element by element, so there are no false alarms. With ``"skip"`` it checks its own weights too (one more
reduction), so that a learner whose own weights went non-finite can rejoin.

What happens to non-finite weights:

* ``"raise"``: :class:`~horovod_dpsgd.NonFiniteError` naming the source rank(s) and the step, on every learner
  that received them (so the job stops before they spread). The source itself raises too: its gradient, taken
  at its non-finite weights, is not finite (or, with full averaging, every rank names it).
* ``"skip"``: they are left out of this step's mix and the remaining weights renormalised,
  ``w_s,j = sum_{k finite} W_jk w_k / sum_{k finite} W_jk``. A learner whose own weights are non-finite thus
  takes its finite neighbours' average and rejoins training. The first time each source is left out a
  :class:`RuntimeWarning` names it and the step; ``rejected`` counts every occurrence. (That step's mixing
  matrix is then not doubly stochastic: the average ``w_a`` moves towards the finite learners.)
* ``"ignore"``: no check (Horovod's behaviour); the averager then has no screen at all.
"""

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from horovod_dpsgd.errors import NonFiniteError
from horovod_dpsgd.topology import MixingPlan

__all__ = ["finite", "WeightScreen"]


def finite(buffers: Sequence[torch.Tensor]) -> List[bool]:
    """For each flat buffer, whether all its elements are finite: one sum per buffer, one host sync."""
    if not buffers:
        return []
    sums = [b.sum(dtype=torch.promote_types(b.dtype, torch.float32)).to(buffers[0].device) for b in buffers]
    flags = torch.stack(sums).isfinite().tolist()
    # A sum can overflow although every element is finite: confirm the suspects element by element.
    return [ok or bool(torch.isfinite(b).all()) for ok, b in zip(flags, buffers)]


class WeightScreen:
    """Checks the weights a learner is about to mix, under the policy ``"raise"`` or ``"skip"``."""

    __slots__ = ("policy", "rank", "rejected")

    def __init__(self, policy: str, rank: int):
        if policy not in ("raise", "skip"):
            raise ValueError(f"a weight screen's policy is 'raise' or 'skip', not {policy!r}")
        self.policy, self.rank = policy, rank
        self.rejected: Dict[int, int] = {}  # source rank -> mixes it was left out of

    def weights(self, plan: MixingPlan, own: Sequence[torch.Tensor], received: Sequence[Sequence[torch.Tensor]],
                step: int) -> Optional[Tuple[float, Tuple[float, ...]]]:
        """``(self_weight, peer_weights)`` to mix with: ``plan``'s, with non-finite weights left out.

        ``own[g]`` is this learner's buffer of dtype group ``g`` (checked with ``"skip"`` only),
        ``received[g][i]`` the one from ``plan.peers[i]``. Returns None when nothing finite is left to mix (the
        weights stay as they are).
        """
        mine = list(own) if self.policy == "skip" else []  # "raise": what was received (the source raises too)
        groups, peers = len(received), len(plan.peers)
        flags = finite(mine + [b for bufs in received for b in bufs])
        if all(flags):
            return plan.self_weight, plan.peer_weights
        own_ok, flags = all(flags[:len(mine)]), flags[len(mine):]
        peer_ok = [all(flags[g * peers + i] for g in range(groups)) for i in range(peers)]
        self.reject(([] if own_ok else [self.rank]) + [p for p, ok in zip(plan.peers, peer_ok) if not ok], step)
        self_weight = plan.self_weight if own_ok else 0.0
        peer_weights = [w if ok else 0.0 for w, ok in zip(plan.peer_weights, peer_ok)]
        total = self_weight + sum(peer_weights)
        if total <= 0.0:
            return None
        return self_weight / total, tuple(w / total for w in peer_weights)

    def reject(self, sources: Sequence[int], step: int) -> None:
        """Learners ``sources`` hold non-finite weights at ``step``: raise, or warn (first time) and count."""
        sources = sorted(set(sources))
        if not sources:
            return
        others = [r for r in sources if r != self.rank]
        whose = [f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"] if others else []
        if self.rank in sources:
            whose.append(f"this learner (rank {self.rank})")
        if self.policy == "raise":
            raise NonFiniteError(
                f"rank {self.rank}: at step {step} the weights of {' and '.join(whose)} are NaN or infinite; mixing "
                "would spread them to every learner. Lower the learning rate or add gradient clipping, or pass "
                "nonfinite='skip' to leave non-finite weights out of the mix")
        for r in sources:
            first = r not in self.rejected
            self.rejected[r] = self.rejected.get(r, 0) + 1
            if first:
                what = "its own NaN or infinite weights" if r == self.rank else \
                    f"the NaN or infinite weights received from rank {r}"
                warnings.warn(f"rank {self.rank}: left {what} out of the mix at step {step} (nonfinite='skip'); "
                              f"later occurrences are counted in optimizer.rejected_weights", RuntimeWarning)
