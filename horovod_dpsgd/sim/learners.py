r"""``n`` learners of one model in one process: parameters stacked along a leading learner dimension.

Learner ``j``'s weights ``w_j`` are row ``j`` of every stacked parameter (``shape = (n, *model_shape)``). The
forward and backward passes of all learners run at once: :func:`torch.func.vmap` over
:func:`torch.func.functional_call` maps the model over the learner dimension of the parameters and of the
inputs, so a linear layer becomes one batched matrix product for all learners, with the same maths as each
learner's own. Since the learners' losses are independent, the gradient of their sum holds, in row ``j``, the
gradient of learner ``j``'s loss at its own weights, ``grad L_mu_j(w_j)`` (paper Eq. 2).
"""

import copy
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["Learners"]


def _learner_major(t: torch.Tensor) -> bool:
    """Whether each learner's elements of ``t`` fill one block of consecutive memory, the blocks in learner order."""
    n = t.shape[0]
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape[1:], t.stride()[1:]) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return n == 1 or t.stride(0) == expected


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _set_grad_view(view: torch.Tensor, stacked_grad: Optional[torch.Tensor], j: int) -> None:
    """``view.grad = stacked_grad[j]``, keeping the same view object while ``stacked_grad`` is the same tensor (so
    its identity and version say, as for any ``.grad``, whether the gradient was replaced or changed)."""
    if stacked_grad is None:
        view.grad = None
    elif view.grad is None or getattr(view, "_stacked_grad", lambda: None)() is not stacked_grad:
        view.grad = stacked_grad[j]
        view._stacked_grad = weakref.ref(stacked_grad)


class Learners(nn.Module):
    """``n`` copies of ``model`` trained side by side, their parameters and buffers stacked along dim 0.

    Every learner starts from ``model``'s weights (as after ``hvd.broadcast_parameters``); pass ``init`` to start
    learner ``j`` from ``init[j]``'s weights instead. ``learners(x)`` runs learner ``j`` on ``x[j]`` for every
    ``j``: inputs and outputs carry the learner dimension first. ``model`` itself is not changed or used later.

    Args:
        model: the model of one learner (any ``nn.Module`` that :func:`torch.func.functional_call` can run).
        n: number of learners.
        init: optional list of ``n`` models of the same structure, learner ``j``'s initial weights and buffers.
        randomness: ``vmap``'s ``randomness``: ``"different"`` (default; e.g. each learner its own dropout
            masks), ``"same"``, or ``"error"``.

    Attributes:
        module: a copy of ``model`` whose parameters and buffers are the stacked ones (``shape (n, ...)``); its
            ``named_parameters()`` carry the model's names. Do not call it directly: call the ``Learners``.
    """

    def __init__(self, model: nn.Module, n: int, *, init: Optional[List[nn.Module]] = None,
                 randomness: str = "different"):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of learners must be a positive integer, got {n!r}")
        if randomness not in ("different", "same", "error"):
            raise ValueError(f"randomness must be 'different', 'same' or 'error', got {randomness!r}")
        sources = [model] * n if init is None else list(init)
        if len(sources) != n:
            raise ValueError(f"init has {len(sources)} models for {n} learners; give one per learner")
        tensors = [{**dict(s.named_parameters()), **dict(s.named_buffers())} for s in sources]
        shapes = {name: t.shape for name, t in [*model.named_parameters(), *model.named_buffers()]}
        if any({name: t.shape for name, t in other.items()} != shapes for other in tensors):
            raise ValueError("the init models differ from model in their parameters or buffers (names or shapes); "
                             "every learner must have the same structure")
        memo: Dict[int, Any] = {}  # each of model's tensors -> its stack over learners, in the copy made below
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                stacked = torch.stack([own[name].detach().to(t.device) for own in tensors])
                memo[id(t)] = nn.Parameter(stacked, requires_grad=t.requires_grad) \
                    if isinstance(t, nn.Parameter) else stacked
        self.module = copy.deepcopy(model, memo)
        self.n = n
        self.randomness = randomness
        # Learner j's view of the stacked tensors, as a model of its own (built on demand, see learner()).
        self.__dict__["_replicas"] = None
        # The parameters are laid out as their gradients come, at the first forward pass (see _adopt_layout).
        self.__dict__["_laid_out"] = False

    # -- forward ---------------------------------------------------------------------------------------------
    def _stacked(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        return dict(self.module.named_parameters()), dict(self.module.named_buffers())

    def forward(self, *inputs: Any) -> Any:
        """Learner ``j``'s model on ``inputs[...][j]``, for all ``j`` at once; outputs are stacked likewise."""
        for x in inputs:
            if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != self.n):
                raise ValueError(f"inputs carry the learner dimension first: expected shape ({self.n}, ...), got "
                                 f"{tuple(x.shape)}; stack the {self.n} learners' batches with torch.stack")
        if not self.__dict__["_laid_out"]:
            self._adopt_layout(inputs)
        return self._forward(inputs)

    def _forward(self, inputs: Tuple[Any, ...]) -> Any:
        params, buffers = self._stacked()

        def one(params, buffers, *xs):
            return functional_call(self.module, (params, buffers), xs)

        return vmap(one, randomness=self.randomness)(params, buffers, *inputs)

    @torch.no_grad()
    def _adopt_layout(self, inputs: Tuple[Any, ...]) -> None:
        """Lay each stacked parameter out in memory as its gradient comes out of the backward pass, so that autograd
        hands the gradients over without a reordering copy; once, before the first forward pass.

        A batched linear layer, for one, computes the gradient of each learner's ``(out, in)`` weight in ``(in,
        out)`` memory order, which autograd would otherwise copy into the parameter's order at every step (a
        transposing copy of the largest tensor; measured in docs/simulator.md). The layouts are found with a
        forward and backward pass on ``inputs`` that leaves no trace (gradients not accumulated, buffers and random
        state restored). Values, shapes and the parameter objects stay; learner ``j``'s parameters
        (:meth:`learner`) are views that may then not be contiguous (use ``reshape``, not ``view``).
        """
        self.__dict__["_laid_out"] = True
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            return
        device = params[0].device
        buffers = [(b, b.clone()) for b in self.module.buffers()]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            outputs = [t for t in _tensors(self._forward(inputs)) if t.requires_grad]
            grads = torch.autograd.grad(sum(t.sum() for t in outputs), params, allow_unused=True) if outputs else ()
        for b, value in buffers:
            b.copy_(value)
        for p, g in zip(params, grads):
            if g is not None and g.shape == p.shape and g.stride() != p.stride() and _learner_major(g):
                p.data = torch.empty_strided(p.shape, g.stride(), dtype=p.dtype, device=p.device).copy_(p.data)

    def losses(self, loss_fn: Callable[[Any, Any], torch.Tensor], outputs: Any, targets: Any) -> torch.Tensor:
        """``loss_fn(outputs[j], targets[j])`` of every learner, as a tensor of ``n`` losses.

        Back-propagate their sum: row ``j`` of every gradient is then learner ``j``'s own.
        """
        return vmap(loss_fn, randomness=self.randomness)(outputs, targets)

    # -- learners as models of their own ---------------------------------------------------------------------
    def _storage_key(self) -> Tuple:
        params, buffers = self._stacked()
        return tuple((t.data_ptr(), t.stride(), t.device) for t in [*params.values(), *buffers.values()])

    def _build_replicas(self) -> List[nn.Module]:
        params, buffers = self._stacked()
        replicas = []
        for j in range(self.n):
            memo: Dict[int, Any] = {id(p): nn.Parameter(p.data[j], requires_grad=p.requires_grad)
                                    for p in params.values()}
            memo.update({id(b): b[j] for b in buffers.values()})
            replicas.append(copy.deepcopy(self.module, memo))
        return replicas

    def _learner_models(self) -> List[nn.Module]:
        cached, key = self.__dict__["_replicas"], self._storage_key()
        if cached is None or cached[1] != key:  # first use, or the stacked storage was replaced (e.g. .to())
            cached = self.__dict__["_replicas"] = (self._build_replicas(), key)
        return cached[0]

    def learner(self, j: int) -> nn.Module:
        """Learner ``j`` as a model of its own (``model``'s class): its parameters and buffers are views of row
        ``j`` of the stacked ones, so changing them changes the learner, and evaluating it evaluates ``w_j``."""
        if not 0 <= j < self.n:
            raise IndexError(f"learner {j} out of range 0..{self.n - 1}")
        return self._learner_models()[j]

    def learner_parameters(self, params: Optional[List[torch.Tensor]] = None) -> List[List[torch.Tensor]]:
        """For every learner ``j``, its views of the stacked parameters ``params`` (default: all, in the module's
        order), each with ``.grad`` set to row ``j`` of the stacked gradient."""
        stacked = list(self.module.parameters()) if params is None else list(params)
        index = {id(p): i for i, p in enumerate(self.module.parameters())}
        try:
            where = [index[id(p)] for p in stacked]
        except KeyError:
            raise ValueError("a parameter is not one of these learners' stacked parameters") from None
        out = []
        for j, model in enumerate(self._learner_models()):
            own = list(model.parameters())
            views = []
            for p, i in zip(stacked, where):
                view = own[i]
                _set_grad_view(view, p.grad, j)
                views.append(view)
            out.append(views)
        return out

    @torch.no_grad()
    def average(self) -> nn.Module:
        """A model (``model``'s class) holding the learners' average ``w_a``: parameters and floating-point buffers
        are the mean over learners, other buffers learner 0's (as :func:`horovod_dpsgd.checkpoint.average_model`)."""
        params, buffers = self._stacked()
        memo: Dict[int, Any] = {id(p): nn.Parameter(p.detach().mean(0), requires_grad=p.requires_grad)
                                for p in params.values()}
        memo.update({id(b): b.mean(0) if b.is_floating_point() else b[0].clone() for b in buffers.values()})
        return copy.deepcopy(self.module, memo)

    def stacked_parameters(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """``(name, stacked parameter)`` with the model's own names (without the ``module.`` prefix)."""
        return self.module.named_parameters()

    def extra_repr(self) -> str:
        return f"n={self.n}"
