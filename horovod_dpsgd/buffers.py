"""Contiguous communication buffers for a list of parameters.

Parameters are grouped by ``(dtype, device)``; each group is packed into one flat buffer, so
an exchange sends one message per peer and dtype, never one per tensor. Views into the
buffers are built once, and packing/unpacking are single ``torch._foreach_copy_`` calls.
"""

from typing import List, Sequence, Tuple

import torch

__all__ = ["FlatGroup", "FlatParameters"]


class FlatGroup:
    """Parameters of one dtype and device, and the flat buffers that carry them.

    ``send`` holds the packed parameters, ``mixed`` the result of mixing; both live on
    ``comm_device`` (the parameters' device, or the host when CUDA tensors are staged
    through host memory).
    """

    def __init__(self, params: Sequence[torch.Tensor], comm_device: torch.device):
        self.params: List[torch.Tensor] = list(params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.comm_device = comm_device
        self.numel = sum(p.numel() for p in self.params)
        pin = self.device.type == "cuda" and comm_device.type == "cpu"
        self.send = torch.empty(self.numel, dtype=self.dtype, device=comm_device, pin_memory=pin)
        self.mixed = torch.empty(self.numel, dtype=self.dtype, device=comm_device, pin_memory=pin)
        self._recv: List[torch.Tensor] = []
        self._recv_views = {}  # data_ptr of a receive buffer -> per-parameter views into it
        # Staging buffer on the parameters' device when communication happens on the host.
        self._staging = None if comm_device == self.device else torch.empty(
            self.numel, dtype=self.dtype, device=self.device)
        packed = self._staging if self._staging is not None else self.send
        self._pack_views = self._views(packed)
        self._unpack_src = self._staging if self._staging is not None else self.mixed
        self._unpack_views = self._views(self._unpack_src)

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def recv_buffers(self, count: int, dtype: torch.dtype) -> List[torch.Tensor]:
        """``count`` receive buffers of this group's size in ``dtype`` (allocated once, reused)."""
        if any(b.dtype != dtype for b in self._recv):
            self._recv, self._recv_views = [], {}
        while len(self._recv) < count:
            buf = torch.empty(self.numel, dtype=dtype, device=self.comm_device, pin_memory=self.send.is_pinned())
            self._recv.append(buf)
            self._recv_views[buf.data_ptr()] = self._views(buf)
        return self._recv[:count]

    @torch.no_grad()
    def mix(self, self_weight: float, peers: Sequence[Tuple[float, torch.Tensor]]) -> None:
        """Set the parameters to ``self_weight * w_own + sum_k weight_k * w_k``.

        ``w_own`` is the packed ``send`` buffer, which the parameters still equal; ``peers``
        are ``(weight_k, flat w_k)`` pairs. Without host staging the result is computed in
        place in the parameters (no extra pass over a result buffer).
        """
        if self._staging is None:
            views = [self._recv_views.get(flat.data_ptr()) or self._views(flat.to(self.dtype)) for _, flat in peers]
            if len(peers) == 1 and abs(self_weight + peers[0][0] - 1.0) < 1e-12:
                # One peer (random peer): w + a (w_k - w), a single pass over the parameters.
                torch._foreach_lerp_(self.params, views[0], peers[0][0])
                return
            torch._foreach_mul_(self.params, self_weight)
            for (weight, _), peer_views in zip(peers, views):
                torch._foreach_add_(self.params, peer_views, alpha=weight)
        else:
            torch.mul(self.send, self_weight, out=self.mixed)
            for weight, flat in peers:
                self.mixed.add_(flat.to(self.dtype), alpha=weight)
            self.unpack()

    @torch.no_grad()
    def pack(self) -> torch.Tensor:
        """Copy the parameters into ``send`` and return it."""
        torch._foreach_copy_(self._pack_views, self.params)
        if self._staging is not None:
            self.send.copy_(self._staging)
        elif self.send.is_cuda:  # CUDA-aware MPI reads the buffer directly: the copies must have finished
            torch.cuda.current_stream(self.send.device).synchronize()
        return self.send

    @torch.no_grad()
    def unpack(self) -> None:
        """Copy ``mixed`` into the parameters."""
        if self._staging is not None:
            self._staging.copy_(self.mixed)
        torch._foreach_copy_(self.params, self._unpack_views)


class FlatParameters:
    """All trainable parameters of an optimizer, as one :class:`FlatGroup` per dtype/device."""

    def __init__(self, params: Sequence[torch.Tensor], cuda_aware: bool = False):
        groups = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.groups: List[FlatGroup] = []
        for (dtype, device), ps in groups.items():
            comm_device = device if (device.type == "cpu" or cuda_aware) else torch.device("cpu")
            self.groups.append(FlatGroup(ps, comm_device))
