"""The paper's models: shapes, and sizes against the paper's Table 1 (MiB of 4-byte parameters)."""

import pytest
import torch

from horovod_dpsgd.models import CIFAR10_MODELS, MODEL_NAMES, TABLE1_MIB, get_model


@pytest.mark.parametrize("name", list(TABLE1_MIB))
def test_parameter_count_matches_table1_within_half_a_percent(name):
    params = sum(p.numel() for p in get_model(name).parameters())
    assert params * 4 / 2 ** 20 == pytest.approx(TABLE1_MIB[name], rel=0.005)


@pytest.mark.parametrize("name", list(CIFAR10_MODELS) + ["shufflenet_g2"])
def test_cifar_models_map_32x32_images_to_10_logits(name):
    model = get_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_and_lstm_shapes():
    assert sum(p.numel() for p in get_model("mlp").parameters()) == 784 * 50 + 50 + 50 * 50 + 50 + 50 * 10 + 10
    assert get_model("mlp")(torch.randn(3, 784)).shape == (3, 10)
    small = get_model("lstm", input_dim=40, hidden_size=16, num_classes=10)
    assert small(torch.randn(2, 7, 40)).shape == (2, 10)
    assert small.lstm.num_layers == 6 and small.lstm.bidirectional


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="resnet18"):
        get_model("resnet1000")
    assert "efficientnet_b0" in MODEL_NAMES and get_model("ResNet18") is not None
