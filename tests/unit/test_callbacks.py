"""GaussianNoise (SSGD*) and the callback interface, in one process."""

import math

import pytest
import torch

from horovod_dpsgd.callbacks import Callback, GaussianNoise, StepContext


def context(params, step=0, rank=0, algorithm="dpsgd"):
    opt = torch.optim.SGD(params, lr=0.5)
    return StepContext(opt, step, rank, 4, algorithm)


def noise_sample(sigma, n=200_000, **kw):
    p = torch.nn.Parameter(torch.zeros(n))
    GaussianNoise(sigma, seed=3).on_after_update(context([p], **kw))
    return p.detach()


def test_noise_has_the_requested_standard_deviation():
    # With N = 2e5 samples the sample std has relative standard error 1/sqrt(2N) = 0.16 %,
    # and the mean has standard error sigma/sqrt(N); the tolerances below are > 6 standard errors.
    x = noise_sample(0.05)
    assert x.std().item() == pytest.approx(0.05, rel=0.01)
    assert abs(x.mean().item()) < 6 * 0.05 / math.sqrt(len(x))


def test_sigma_may_be_a_function_of_the_step():
    x = noise_sample(lambda step: 0.01 * step, step=3)
    assert x.std().item() == pytest.approx(0.03, rel=0.01)
    assert noise_sample(lambda step: 0.0).abs().max() == 0


def test_noise_is_reproducible_same_across_ranks_in_ssgd_independent_in_dpsgd():
    assert torch.equal(noise_sample(0.1, n=100), noise_sample(0.1, n=100))
    assert torch.equal(noise_sample(0.1, n=100, rank=0, algorithm="ssgd"),
                       noise_sample(0.1, n=100, rank=1, algorithm="ssgd"))
    assert not torch.equal(noise_sample(0.1, n=100, rank=0), noise_sample(0.1, n=100, rank=1))
    assert not torch.equal(noise_sample(0.1, n=100, step=0), noise_sample(0.1, n=100, step=1))


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_invalid_sigma_is_rejected(sigma):
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(sigma)


def test_invalid_sigma_from_a_function_is_rejected_at_that_step():
    with pytest.raises(ValueError, match="sigma"):
        noise_sample(lambda step: -1.0, n=10)


def test_context_lists_trainable_parameters_and_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    ctx = context([a, b])
    assert list(ctx.parameters()) == [a] and ctx.lr == 0.5
    cb = Callback()
    cb.on_before_mixing(ctx), cb.on_after_mixing(ctx), cb.on_after_update(ctx)  # no-ops by default
