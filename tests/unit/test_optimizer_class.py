"""How DistributedOptimizer builds its class and settings (one process; the MPI behaviour is in the parallel tests)."""

import dataclasses
import inspect

import pytest
import torch
import horovod.torch as hvd

import horovod_dpsgd
from horovod_dpsgd.algorithms.base import Algorithm
from horovod_dpsgd.algorithms.dpsgd import DPSGD
from horovod_dpsgd.algorithms.ssgd import SSGD


@pytest.fixture(scope="module", autouse=True)
def one_learner():
    hvd.init()
    yield


def build(algorithm, monkeypatch, optimizer_cls=torch.optim.SGD, **kw):
    # As under `horovodrun -np 1`: one learner, launched by MPI on purpose.
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    model = torch.nn.Linear(3, 2)
    opt = optimizer_cls(model.parameters(), lr=0.1)
    return model, horovod_dpsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                                     algorithm=algorithm, **kw)


@pytest.mark.parametrize("algorithm,mixin", [("dpsgd", DPSGD), ("ssgd", SSGD)])
def test_the_algorithm_mixin_comes_before_the_users_class(algorithm, mixin, monkeypatch):
    _, opt = build(algorithm, monkeypatch, optimizer_cls=torch.optim.Adam)
    mro = type(opt).__mro__
    assert type(opt).__name__ == "Adam"
    assert mro[1:4] == (mixin, Algorithm, torch.optim.Adam)
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, mixin)
    assert "under " + mixin.__name__ in type(opt).__doc__


@pytest.mark.parametrize("algorithm", ["dpsgd", "ssgd"])
def test_a_step_updates_like_the_wrapped_optimizer_and_counts(algorithm, monkeypatch):
    model, opt = build(algorithm, monkeypatch)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for m, o in ((model, opt), (reference, plain)):
        o.zero_grad(set_to_none=True)
        m(torch.ones(4, 3)).pow(2).sum().backward()
        o.step()
    assert opt.step_count == 1
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_a_step_before_any_backward_only_initialises_state(monkeypatch):
    model, opt = build("dpsgd", monkeypatch)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # what hvd.broadcast_optimizer_state does with an empty state
    assert opt.step_count == 0


def test_options_are_validated_once_and_frozen(monkeypatch):
    monkeypatch.setenv("HOROVOD_DPSGD_TIMEOUT", "12.5")
    options = horovod_dpsgd.Options(topology="ring")
    assert options.timeout == 12.5 and options.cuda_aware is False and options.callbacks == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 3
    assert options.replace(seed=3).seed == 3
    with pytest.raises(ValueError, match="choose one of dpsgd, ssgd"):
        horovod_dpsgd.Options(algorithm="sgd")
    with pytest.raises(ValueError, match="nonfinite must be one of raise, skip, ignore"):
        horovod_dpsgd.Options(nonfinite="warn")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        horovod_dpsgd.Options(timeout=0)
    with pytest.raises(TypeError, match="horovod_dpsgd.Callback"):
        horovod_dpsgd.Options(callbacks=[print])


def test_the_optimizer_holds_its_options(monkeypatch):
    _, opt = build("dpsgd", monkeypatch, topology="ring", seed=4)
    assert opt.options == horovod_dpsgd.Options(topology="ring", seed=4)


def test_the_factory_takes_the_options_fields_as_keywords():
    keywords = [p.name for p in inspect.signature(horovod_dpsgd.DistributedOptimizer).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keywords == [f.name for f in dataclasses.fields(horovod_dpsgd.Options)]
