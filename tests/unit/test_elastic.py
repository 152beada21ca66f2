"""Elastic Horovod with algorithm='dpsgd' is refused at construction, saying why and what to do instead
(docs/api.md, "Elastic Horovod"). horovodrun's elastic driver sets HOROVOD_ELASTIC=1 in every worker; here a
one-process Horovod world with that variable stands in for a worker (tests/integration/test_horovod_examples.py runs
Horovod's elastic examples themselves)."""

import pytest
import torch
import horovod.torch as hvd

import horovod_dpsgd as hd


@pytest.fixture(scope="module", autouse=True)
def one_learner():
    hvd.init()
    yield


def test_dpsgd_under_elastic_horovod_is_refused_naming_the_alternatives(monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(hd.MPIEnvironmentError) as error:
        hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    message = str(error.value)
    assert message.startswith("algorithm='dpsgd' does not support Elastic Horovod")
    assert "horovodrun -np N python script.py" in message and "horovod_dpsgd.checkpoint" in message
    assert "algorithm='ssgd'" in message


def test_ssgd_under_elastic_horovod_is_horovods_own_optimizer_path(monkeypatch):
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    model = torch.nn.Linear(3, 2)
    opt = hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), algorithm="ssgd")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.step_count == 1
