"""The non-finite weights check (horovod_dpsgd.comm.screen) and the mix that leaves weights out, in one process."""

import warnings

import pytest
import torch

from horovod_dpsgd.comm.buffers import FlatGroup
from horovod_dpsgd.comm.screen import WeightScreen, finite
from horovod_dpsgd.errors import NonFiniteError
from horovod_dpsgd.topology import MixingPlan


def test_finite_flags_nan_and_infinity_in_any_dtype_but_not_a_sum_that_merely_overflows():
    ok = torch.ones(10)
    nan, inf, ninf = ok.clone(), ok.clone(), ok.clone()
    nan[3], inf[0], ninf[9] = float("nan"), float("inf"), float("-inf")
    big = torch.full((4,), 3e38)                        # finite, but the float32 sum overflows
    half = torch.full((8,), 60000.0, dtype=torch.float16)  # finite, the fp16 sum would overflow
    assert finite([ok, nan, inf, ninf, big, half, torch.zeros(0)]) == [True, False, False, False, True, True, True]
    assert finite([]) == []


def plan(self_weight, peers, weights):
    return MixingPlan(self_weight, tuple(peers), tuple(weights))


def flat(weights):
    return [weights[0], *weights[1]]


def test_finite_weights_keep_the_plans_weights():
    screen = WeightScreen("skip", rank=0)
    p = plan(1 / 3, [1, 2], [1 / 3, 1 / 3])
    assert screen.weights(p, [torch.ones(4)], [[torch.ones(4), torch.ones(4)]], step=0) == (1 / 3, (1 / 3, 1 / 3))
    assert screen.rejected == {}


def test_skip_leaves_a_peers_non_finite_weights_out_and_renormalises_warning_once():
    screen = WeightScreen("skip", rank=0)
    p = plan(0.5, [1, 2], [0.25, 0.25])
    bad = torch.tensor([1.0, float("nan")])
    with pytest.warns(RuntimeWarning, match=r"rank 0: left the NaN or infinite weights received from rank 2 out "
                                            r"of the mix at step 7"):
        w = screen.weights(p, [torch.ones(2)], [[torch.ones(2), bad]], step=7)
    assert flat(w) == pytest.approx([2 / 3, 1 / 3, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is counted, not warned
        screen.weights(p, [torch.ones(2)], [[torch.ones(2), bad]], step=8)
    assert screen.rejected == {2: 2}


def test_skip_replaces_own_non_finite_weights_by_the_finite_neighbours_average():
    screen = WeightScreen("skip", rank=1)
    p = plan(0.5, [0, 2], [0.25, 0.25])
    own = [torch.tensor([float("inf"), 0.0]), torch.zeros(3, dtype=torch.float64)]  # two dtype groups
    received = [[torch.ones(2), torch.ones(2)], [torch.ones(3, dtype=torch.float64)] * 2]
    with pytest.warns(RuntimeWarning, match="rank 1: left its own NaN or infinite weights out of the mix at step 3"):
        assert flat(screen.weights(p, own, received, step=3)) == pytest.approx([0.0, 0.5, 0.5])
    # a peer is left out if any of its dtype groups is not finite
    received[1][0] = torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)
    assert flat(screen.weights(p, own, received, step=4)) == pytest.approx([0.0, 0.0, 1.0])
    received[0][1] = torch.tensor([float("nan"), 0.0])
    assert screen.weights(p, own, received, step=5) is None  # nothing finite left: keep the weights
    assert screen.rejected == {1: 3, 0: 2, 2: 1}


def test_raise_names_the_source_ranks_and_the_step_checking_only_what_was_received():
    screen = WeightScreen("raise", rank=3)
    p = plan(0.5, [2, 4], [0.25, 0.25])
    bad = torch.tensor([float("nan")])
    with pytest.raises(NonFiniteError, match=r"rank 3: at step 11 the weights of ranks 2, 4 are NaN or infinite"):
        screen.weights(p, [torch.ones(1)], [[bad, bad]], step=11)
    with pytest.raises(NonFiniteError, match=r"the weights of rank 2 are NaN"):
        screen.weights(p, [bad], [[bad, torch.ones(1)]], step=11)
    # its own weights are this learner's gradient check's business (and its neighbours')
    assert screen.weights(p, [bad], [[torch.ones(1), torch.ones(1)]], step=11) == (0.5, (0.25, 0.25))
    with pytest.raises(NonFiniteError, match=r"weights of rank 2 and this learner \(rank 3\)"):
        screen.reject([2, 3], step=11)  # full averaging names every non-finite rank, itself included


@pytest.mark.parametrize("peers", [[(1.0, 2.0)], [(0.5, 2.0), (0.5, 4.0)]])
def test_mix_without_own_weights_never_touches_their_nan(peers):
    group = FlatGroup([torch.nn.Parameter(torch.full((5,), float("nan")))], torch.device("cpu"))
    group.mix(0.0, [(w, torch.full((5,), v)) for w, v in peers])
    assert torch.equal(group.flat, torch.full((5,), sum(w * v for w, v in peers)))


def test_mix_with_every_peer_left_out_keeps_own_weights():
    group = FlatGroup([torch.nn.Parameter(torch.arange(4.0))], torch.device("cpu"))
    group.mix(1.0, [])
    assert torch.equal(group.flat, torch.arange(4.0))
