"""Models of the paper: the Sec. 2 MLP (more in later modules)."""

from typing import Callable, Dict

from torch import nn

from horovod_dpsgd.models.mlp import MLP

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {"mlp": MLP}
MODEL_NAMES = tuple(_REGISTRY)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name (see ``MODEL_NAMES``)."""
    try:
        return _REGISTRY[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
