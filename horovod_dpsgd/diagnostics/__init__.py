"""The paper's noise diagnostics (Sec. 2, Eq. 3-4).

* :mod:`.quantities`: each equation as a function of flat vectors (``alpha_e``, ``Delta``, ``Delta^(2)``,
  consensus distance, Hessian-vector products).
* :class:`NoiseDiagnostics`: the callback that measures them during training and logs them to TensorBoard.
"""

from horovod_dpsgd.diagnostics.callback import TAGS, NoiseDiagnostics

__all__ = ["NoiseDiagnostics", "TAGS"]
