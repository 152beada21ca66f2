"""Synchronous SGD, paper Eq. 1: Horovod's own gradient allreduce, plus callbacks."""

from horovod.torch.optimizer import _DistributedOptimizer as _HorovodOptimizer

from horovod_dpsgd.algorithms.base import StepTracking


class SSGD(StepTracking):
    """Horovod's ``_DistributedOptimizer`` with step counting and callbacks."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, callbacks, nonfinite):
        _HorovodOptimizer.__init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                                   gradient_predivide_factor, groups, sparse_as_dense, process_set)
        named = [(self._parameter_names.get(p, str(i)), p) for i, p in
                 enumerate(p for group in self.param_groups for p in group["params"] if p.requires_grad)]
        self._init_tracking(named, callbacks, "ssgd", nonfinite)

    def step(self, closure=None):
        if not self._pending:  # state initialisation, see DPSGD.step
            return super(self.__class__, self).step(closure)
        if self._should_synchronize and not self._synchronized:
            self.synchronize()
        self._run_callbacks("on_before_mixing")
        self._run_callbacks("on_after_mixing")
        loss = None
        if self._gradients_finite():
            with self.skip_synchronize():
                loss = _HorovodOptimizer.step(self, closure)
        else:
            self._synchronized = False
        self._run_callbacks("on_after_update")
        self._step_count += 1
        self._pending = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict) -> None:
        _HorovodOptimizer.load_state_dict(self, self._load_tracking(state_dict))
