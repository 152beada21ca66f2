"""The paper's models: shapes, exact sizes of the pytorch-cifar recipes, and sizes against Table 1.

Table 1 gives sizes in "MB" of 4-byte parameters; they are MiB (2**20 bytes): ResNet-18's 11,173,962
parameters are 42.63 MiB (Table 1: 42.63 MB) but 44.70 * 10**6 bytes. See docs/models.md.
"""

import functools

import pytest
import torch

from horovod_dpsgd.experiments.models import CIFAR10_MODELS, MODEL_NAMES, TABLE1_MIB, get_model

# Parameter counts of kuangliu/pytorch-cifar's models (10 classes), counted from its sources: EfficientNetB0 as
# first published (commit ab90832, 2019), the rest at the repository's last commit (49b7aa9).
PYTORCH_CIFAR_PARAMS = {
    "efficientnet_b0": 2_912_089, "senet18": 11_260_354, "vgg19": 20_040_522, "resnet18": 11_173_962,
    "densenet121": 6_956_298, "mobilenet": 3_217_226, "mobilenet_v2": 2_296_922, "shufflenet": 1_263_854,
    "shufflenet_g2": 887_582, "googlenet": 6_166_250, "resnext29": 9_128_778,
}
# Default BiLSTM: 6 bidirectional layers of 512 cells on 260-dim input, 256-unit bottleneck, 32,000 outputs.
LSTM_PARAMS = 2 * (4 * 512 * (260 + 512) + 8 * 512) + 5 * 2 * (4 * 512 * (1024 + 512) + 8 * 512) \
    + (1024 * 256 + 256) + (256 * 32_000 + 32_000)


@functools.cache
def _num_params(name: str) -> int:
    return sum(p.numel() for p in get_model(name).parameters())


def test_table1_sizes_are_mebibytes_not_megabytes():
    assert round(11_173_962 * 4 / 2 ** 20, 2) == TABLE1_MIB["resnet18"] == 42.63
    assert round(11_173_962 * 4 / 10 ** 6, 2) == 44.70


@pytest.mark.parametrize("name", list(TABLE1_MIB))
def test_parameter_count_matches_table1_within_half_a_percent(name):
    assert _num_params(name) * 4 / 2 ** 20 == pytest.approx(TABLE1_MIB[name], rel=0.005)


@pytest.mark.parametrize("name", list(PYTORCH_CIFAR_PARAMS))
def test_parameter_count_equals_pytorch_cifar(name):
    assert _num_params(name) == PYTORCH_CIFAR_PARAMS[name]


def test_lstm_default_size_is_table1_exactly():
    assert _num_params("lstm") == LSTM_PARAMS == 43_154_944
    assert round(LSTM_PARAMS * 4 / 2 ** 20, 2) == TABLE1_MIB["lstm"] == 164.62


@pytest.mark.parametrize("name", list(CIFAR10_MODELS) + ["shufflenet_g2"])
def test_cifar_models_map_32x32_images_to_10_logits(name):
    model = get_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_models_take_num_classes():
    assert get_model("resnet18", num_classes=100).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_mlp_is_784_50_50_10_with_relu():
    mlp = get_model("mlp")
    assert _num_params("mlp") == 784 * 50 + 50 + 50 * 50 + 50 + 50 * 10 + 10
    assert sum(isinstance(m, torch.nn.ReLU) for m in mlp.modules()) == 2
    assert mlp(torch.randn(2, 784)).shape == (2, 10)
    assert mlp(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # image-shaped input is flattened


def test_lstm_is_configurable_6_layer_bidirectional():
    small = get_model("lstm", input_dim=40, hidden_size=16, num_classes=10)
    assert small.lstm.num_layers == 6 and small.lstm.bidirectional and small.lstm.hidden_size == 16
    assert small(torch.randn(2, 7, 40)).shape == (2, 10)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="resnet1000") as info:
        get_model("resnet1000")
    assert all(name in str(info.value) for name in MODEL_NAMES)
    assert set(CIFAR10_MODELS) | {"lstm", "mlp"} <= set(MODEL_NAMES)
    # Names are case-insensitive and accept "-" for "_".
    assert type(get_model("ResNet18")) is type(get_model("resnet18"))
    assert type(get_model("MobileNet-V2")) is type(get_model("mobilenet_v2"))
