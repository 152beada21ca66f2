"""The parameters' contiguous storage, which the exchange sends from and mixes into.

Parameters are grouped by ``(dtype, device)``. Each group's parameters are moved into one flat
tensor (``param.data`` becomes a view into it, as in apex's and DeepSpeed's flat parameter
buffers), so an exchange sends one message per peer and dtype straight from the parameters,
without a packing copy, and mixing is one kernel over the whole group.
"""

from typing import List, Sequence, Tuple

import torch

from horovod_dpsgd.errors import ParameterMismatchError

__all__ = ["FlatGroup", "FlatParameters"]


def _is_dense(t: torch.Tensor) -> bool:
    """True if ``t``'s elements fill exactly ``t.numel()`` consecutive storage slots (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """``flat[offset:offset + like.numel()]`` shaped like ``like``, keeping its memory format when dense."""
    if _is_dense(like):
        return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)
    return flat[offset:offset + like.numel()].view(like.shape)


class FlatGroup:
    """Parameters of one dtype and device, stored as views into one flat tensor.

    ``flat`` is the parameters' storage. ``send`` is what goes on the wire: ``flat`` itself, or
    a pinned host copy when CUDA parameters are staged through host memory (``comm_device``
    is the host, without CUDA-aware MPI).
    """

    def __init__(self, params: Sequence[torch.Tensor], comm_device: torch.device):
        self.params: List[torch.Tensor] = list(params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.comm_device = comm_device
        self.numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self._adopt()
        staged = comm_device != self.device
        self._pin = self.device.type == "cuda" and comm_device.type == "cpu"
        self.send = self._buffer(self.dtype) if staged else self.flat
        self._sum = None
        self._recv: List[torch.Tensor] = []

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self.numel, dtype=dtype, device=self.comm_device, pin_memory=self._pin)

    @torch.no_grad()
    def _adopt(self) -> None:
        """Copy the parameters into ``flat`` and make each ``param.data`` a view of it."""
        offset = 0
        for p in self.params:
            view = _view(self.flat, offset, p)
            view.copy_(p)
            p.data = view
            offset += p.numel()
        self._data_ptrs = [p.data_ptr() for p in self.params]

    def _check_storage(self) -> None:
        """Re-adopt parameters whose storage was replaced (e.g. ``param.data = ...``, a checkpoint loader)."""
        if all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._data_ptrs)):
            return
        for p in self.params:
            if p.dtype != self.dtype or p.device != self.device:
                raise ParameterMismatchError(
                    f"a parameter moved from {self.dtype} on {self.device} to {p.dtype} on {p.device} after the "
                    "DPSGD optimizer was built; move the model (model.to(...)) before building the optimizer")
        self._adopt()

    @torch.no_grad()
    def send_buffer(self) -> torch.Tensor:
        """The group's weights, ready for MPI to read: ``flat`` itself, or its host copy when staging."""
        self._check_storage()
        if self.send is not self.flat:
            self.send.copy_(self.flat)
        elif self.flat.is_cuda:  # CUDA-aware MPI reads the buffer directly: pending writes must have finished
            torch.cuda.current_stream(self.flat.device).synchronize()
        return self.send

    def recv_buffers(self, count: int, dtype: torch.dtype) -> List[torch.Tensor]:
        """``count`` receive buffers of this group's size in ``dtype`` (allocated once, reused)."""
        if any(b.dtype != dtype for b in self._recv):
            self._recv = []
        while len(self._recv) < count:
            self._recv.append(self._buffer(dtype))
        return self._recv[:count]

    def sum_buffer(self) -> torch.Tensor:
        """The buffer an allreduce of ``send`` writes the sum into (allocated once, reused)."""
        if self._sum is None:
            self._sum = self._buffer(self.dtype)
        return self._sum

    @torch.no_grad()
    def mix(self, self_weight: float, peers: Sequence[Tuple[float, torch.Tensor]]) -> None:
        """Set the parameters to ``self_weight * w_own + sum_k weight_k * w_k``, in place.

        ``peers`` are ``(weight_k, flat w_k)`` pairs in this group's dtype. When staging, the mix is
        computed in the host copy (which still equals the parameters) and copied back.
        """
        target = self.send
        if not peers and self_weight == 1.0:
            return
        if self_weight == 0.0:  # own weights left out (non-finite): never multiply them, NaN * 0 is NaN
            torch.mul(peers[0][1], peers[0][0], out=target)
            for weight, flat in peers[1:]:
                target.add_(flat, alpha=weight)
        elif len(peers) == 1 and abs(self_weight + peers[0][0] - 1.0) < 1e-12:
            # One peer (random peer): w + a (w_k - w), a single pass.
            target.lerp_(peers[0][1], peers[0][0])
        else:
            target.mul_(self_weight)
            for weight, flat in peers:
                target.add_(flat, alpha=weight)
        if target is not self.flat:
            self.flat.copy_(target)

    @torch.no_grad()
    def assign(self, values: torch.Tensor) -> None:
        """Set the parameters to ``values`` (a flat tensor of this group's size and dtype)."""
        self.flat.copy_(values)

    @torch.no_grad()
    def set_average(self, total: torch.Tensor, count: int) -> None:
        """Set the parameters to ``total / count`` (full averaging)."""
        if self.send is self.flat:
            torch.div(total, count, out=self.flat)
        else:
            self.flat.copy_(total.div_(count))


class FlatParameters:
    """All trainable parameters of an optimizer, as one :class:`FlatGroup` per dtype/device.

    Building it moves the parameters into the groups' flat storage (see :class:`FlatGroup`).
    """

    def __init__(self, params: Sequence[torch.Tensor], cuda_aware: bool = False):
        groups = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.groups: List[FlatGroup] = []
        for (dtype, device), ps in groups.items():
            comm_device = device if (device.type == "cpu" or cuda_aware) else torch.device("cpu")
            self.groups.append(FlatGroup(ps, comm_device))
