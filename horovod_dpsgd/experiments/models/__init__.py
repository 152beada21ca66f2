"""The paper's models: ten CIFAR-10 networks, the 6-layer BiLSTM acoustic model, the Sec. 2 MLP.

The CIFAR-10 networks follow the pytorch-cifar recipes the paper cites (32x32 inputs); their sizes are
checked against the paper's Table 1 in tests/unit/test_models.py (see docs/models.md).
"""

from typing import Callable, Dict

from torch import nn

from horovod_dpsgd.experiments.models.densenet import densenet121
from horovod_dpsgd.experiments.models.efficientnet import efficientnet_b0
from horovod_dpsgd.experiments.models.googlenet import googlenet
from horovod_dpsgd.experiments.models.lstm import lstm
from horovod_dpsgd.experiments.models.mlp import MLP
from horovod_dpsgd.experiments.models.mobilenet import mobilenet, mobilenet_v2
from horovod_dpsgd.experiments.models.resnet import resnet18
from horovod_dpsgd.experiments.models.resnext import resnext29_2x64d
from horovod_dpsgd.experiments.models.senet import senet18
from horovod_dpsgd.experiments.models.shufflenet import shufflenet, shufflenet_g2
from horovod_dpsgd.experiments.models.vgg import vgg19

__all__ = ["get_model", "MODEL_NAMES", "CIFAR10_MODELS", "TABLE1_MIB"]

CIFAR10_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "efficientnet_b0": efficientnet_b0, "senet18": senet18, "vgg19": vgg19, "resnet18": resnet18,
    "densenet121": densenet121, "mobilenet": mobilenet, "mobilenet_v2": mobilenet_v2, "shufflenet": shufflenet,
    "googlenet": googlenet, "resnext29": resnext29_2x64d,
}
_REGISTRY: Dict[str, Callable[..., nn.Module]] = {**CIFAR10_MODELS, "shufflenet_g2": shufflenet_g2, "lstm": lstm, "mlp": MLP}
MODEL_NAMES = tuple(_REGISTRY)

#: Model sizes in the paper's Table 1, MiB of 4-byte parameters.
TABLE1_MIB = {"efficientnet_b0": 11.11, "senet18": 42.95, "vgg19": 76.45, "resnet18": 42.63, "densenet121": 26.54,
              "mobilenet": 12.27, "mobilenet_v2": 8.76, "shufflenet": 4.82, "googlenet": 23.53, "resnext29": 34.82,
              "lstm": 164.62}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name (see ``MODEL_NAMES``); keyword arguments go to its constructor."""
    try:
        factory = _REGISTRY[name.lower().replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    return factory(**kwargs)
