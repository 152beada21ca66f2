"""The flat parameter storage the exchange sends from and mixes into, in one process."""

import pytest
import torch

from horovod_dpsgd.comm.buffers import FlatGroup, FlatParameters
from horovod_dpsgd.errors import ParameterMismatchError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


def test_parameters_become_views_of_one_flat_tensor_with_values_and_outputs_unchanged():
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    before, out = [p.detach().clone() for p in model.parameters()], model(x)
    (group,) = FlatParameters(list(model.parameters())).groups
    assert group.numel == sum(p.numel() for p in before)
    for p, b in zip(model.parameters(), before):
        assert p.untyped_storage().data_ptr() == group.flat.untyped_storage().data_ptr()
        assert torch.equal(p, b)
    assert torch.equal(model(x), out)
    assert torch.equal(group.flat, torch.cat([b.reshape(-1) for b in before]))
    # Zero copy: what goes on the wire is the parameters' storage itself.
    assert group.send_buffer().data_ptr() == group.flat.data_ptr()


def test_an_optimizer_step_and_a_gradient_work_on_the_views():
    model = small_model()
    FlatParameters(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    reference = small_model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x = torch.randn(2, 3, 8, 8)
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_channels_last_parameters_keep_their_memory_format():
    conv = torch.nn.Conv2d(8, 8, 3).to(memory_format=torch.channels_last)
    weight = conv.weight.detach().clone()
    FlatParameters(list(conv.parameters()))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, weight)


def test_mix_one_peer_and_several_peers():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    own = torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)])
    group = FlatGroup([a, b], torch.device("cpu"))
    peer1, peer2 = torch.randn(11), torch.randn(11)
    group.mix(0.5, [(0.5, peer1)])
    assert torch.equal(group.flat, torch.lerp(own, peer1, 0.5))
    assert torch.equal(b.detach(), group.flat[5:].view(2, 3))
    own = group.flat.clone()
    group.mix(0.25, [(0.5, peer1), (0.25, peer2)])
    torch.testing.assert_close(group.flat, 0.25 * own + 0.5 * peer1 + 0.25 * peer2)
    total = torch.randn(11)
    group.set_average(total.clone(), 4)
    assert torch.equal(group.flat, total / 4)


def test_a_replaced_parameter_is_adopted_again_before_sending():
    model = small_model()
    (group,) = FlatParameters(list(model.parameters())).groups
    weight = model[3].weight
    new = torch.randn_like(weight)
    with torch.no_grad():
        weight.data = new.clone()  # e.g. a loader that assigns .data
    sent = group.send_buffer()
    assert weight.untyped_storage().data_ptr() == group.flat.untyped_storage().data_ptr()
    assert torch.equal(weight, new)
    offset = sum(p.numel() for p in list(model.parameters())[:2])
    assert torch.equal(sent[offset:offset + new.numel()], new.reshape(-1))


def test_a_parameter_changing_dtype_after_the_optimizer_is_built_is_a_clear_error():
    model = small_model()
    (group,) = FlatParameters(list(model.parameters())).groups
    model.double()
    with pytest.raises(ParameterMismatchError, match=r"before building the optimizer"):
        group.send_buffer()


def test_one_group_per_dtype():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(2))
    groups = FlatParameters([a, b, c]).groups
    assert [(g.dtype, g.numel) for g in groups] == [(torch.float32, 5), (torch.float64, 4)]
