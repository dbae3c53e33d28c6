"""The registry of model families: one entry per family, looked up everywhere.

A `ModelFamily` says what a family is to the rest of the library: its frozen
config class, the model `build` makes of it, the task it trains by default, its
presets, how many attention layers the FLOP count sees, and which Hugging Face
architectures `transformer_jax.hf` maps onto it. The model builder, the trainer,
the run config, checkpoints (`config_io`), FLOPs and the CLI's `info` all read
this table, so a new family is one `register_family` call (in the spirit of the
attention registry and levanter's `register_subclass`):

    register_family(ModelFamily("mlp-lm", MLPConfig, MLPLM, default_task="lm",
                                presets={"mlp-tiny": dict(num_layers=2, d_model=64)}))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn

from transformer_jax.config import TransformerConfig
from transformer_jax.models import configs
from transformer_jax.models.bert import BertForPreTraining
from transformer_jax.models.configs import BertConfig, EncoderDecoderConfig, GPTConfig
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.gpt import GPT


def _num_layers(config: TransformerConfig) -> int:
    return config.num_layers


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One family of models; the field comments give each one's role."""
    name: str                                           # "bert", "gpt", "seq2seq", ...
    config_cls: type                                    # its frozen TransformerConfig subclass
    build: Callable[[Any], nn.Module]                   # config -> the default (pre-training) model
    default_task: str                                   # a `training.tasks` name, e.g. "lm"
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # Attention layers one token passes through: the L of the FLOP count's 12 L d T.
    attention_layers: Callable[[Any], int] = _num_layers
    hf_architectures: tuple[str, ...] = ()             # HF classes `transformer_jax.hf` maps here
    # What the CLI can do with a trained model of this family ("generate", "embed").
    commands: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Makes `family` known to `build`, the trainer, checkpoints and the CLI; its
    presets join `configs.PRESETS`. ValueError on a taken name or preset name."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    if not (isinstance(family.config_cls, type) and issubclass(family.config_cls, TransformerConfig)):
        raise ValueError(f"family {family.name!r}: config_cls={family.config_cls!r} must be a "
                         "TransformerConfig subclass")
    taken = sorted(set(family.presets) & set(configs.PRESETS))
    if taken:
        raise ValueError(f"family {family.name!r}: presets {taken} already exist")
    for preset, fields in family.presets.items():
        configs.PRESETS[preset] = (family.config_cls, dict(fields))
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Removes the family `name` and its presets (for tests and notebooks)."""
    family = _FAMILIES.pop(name)
    for preset in family.presets:
        configs.PRESETS.pop(preset, None)


def names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(_FAMILIES)


def families() -> tuple[ModelFamily, ...]:
    return tuple(_FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    """The family called `name`; ValueError listing the valid ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; valid: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(config) -> ModelFamily:
    """The family of `config` (a config or a config class): the most derived match
    wins, so a subclass registered as its own family is not taken for its parent."""
    cls = config if isinstance(config, type) else type(config)
    matches = [f for f in _FAMILIES.values() if issubclass(cls, f.config_cls)]
    if not matches:
        raise ValueError(f"config of type {cls.__name__} belongs to no registered model "
                         f"family; expected one of "
                         f"{', '.join(f.config_cls.__name__ for f in _FAMILIES.values())}")
    return max(matches, key=lambda f: len(f.config_cls.__mro__))


def config_classes() -> dict[str, type]:
    """{class name: class} of every registered family's config, plus the base class."""
    return {TransformerConfig.__name__: TransformerConfig,
            **{f.config_cls.__name__: f.config_cls for f in _FAMILIES.values()}}


def presets_of(config_cls: type) -> dict[str, dict]:
    """The presets in `configs.PRESETS` whose class is `config_cls`."""
    return {name: fields for name, (cls, fields) in configs.PRESETS.items() if cls is config_cls}


def _encoder_decoder_attention_layers(config: EncoderDecoderConfig) -> int:
    # encoder self-attention + decoder self- and cross-attention
    return config.num_layers + 2 * config.num_decoder_layers


def _builtin(name, config_cls, build, task, **kw) -> None:
    # The built-in presets already sit in `configs.PRESETS`; the entry names them.
    family = ModelFamily(name, config_cls, build, task, **kw)
    _FAMILIES[name] = dataclasses.replace(family, presets=presets_of(config_cls))


_builtin("bert", BertConfig, BertForPreTraining, "mlm", commands=("embed",),
         hf_architectures=("BertModel", "BertForPreTraining", "BertForMaskedLM",
                           "BertForSequenceClassification", "BertForTokenClassification"))
_builtin("gpt", GPTConfig, GPT, "lm", commands=("generate",),
         hf_architectures=("GPT2Model", "GPT2LMHeadModel"))
_builtin("seq2seq", EncoderDecoderConfig, EncoderDecoder, "seq2seq", commands=("generate",),
         attention_layers=_encoder_decoder_attention_layers)


def build(config) -> nn.Module:
    """The default model of `config`'s family: BertForPreTraining, GPT, EncoderDecoder, ..."""
    return family_of(config).build(config)
