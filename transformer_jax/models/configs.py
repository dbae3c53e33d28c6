"""One frozen config per model family, and the table of named presets.

Variants are made with `.replace()`, e.g.
`get_config("gpt-tiny").replace(norm_placement="post", attention={"kind": "chunked"})`.
"""
from __future__ import annotations

import dataclasses

from transformer_jax.attention import registry
from transformer_jax.attention.config import AttentionConfig
from transformer_jax.config import ACTIVATIONS, TransformerConfig
from transformer_jax.validation import boolean, is_int, known_fields, positive_int, require


@dataclasses.dataclass(frozen=True)
class BertConfig(TransformerConfig):
    """BERT (Devlin et al. 2018, arXiv 1810.04805): post-LN encoder, exact GELU,
    segment embeddings, embedding LayerNorm, tanh pooler."""
    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    embedding_norm: bool = True
    causal = False

    def __post_init__(self):
        super().__post_init__()
        # 0 is a BERT without segment embeddings (`Embeddings`: no token-type table).
        require("type_vocab_size", is_int(self.type_vocab_size) and self.type_vocab_size >= 0,
                self.type_vocab_size, "an int >= 0 (the number of segments; 0 = no segment "
                "embeddings)")
        boolean("embedding_norm", self.embedding_norm)
        # The MLM head's transform is one dense layer and an activation (Devlin et al.
        # 2018); SwiGLU needs two projections, which BERT checkpoints do not have.
        mlm_activations = tuple(a for a in ACTIVATIONS if a != "swiglu")
        if self.activation not in mlm_activations:
            raise ValueError(f"activation={self.activation!r} is not valid for BERT, whose MLM "
                             "head transform is one dense layer and an activation; choose one "
                             f"of {', '.join(map(repr, mlm_activations))}")


@dataclasses.dataclass(frozen=True)
class GPTConfig(TransformerConfig):
    """GPT-2 (Radford et al. 2019): pre-LN causal decoder, tanh GELU, eps 1e-5, and
    its initialisation (residual output projections scaled by 1/sqrt(2 L))."""
    vocab_size: int = 50257
    max_len: int = 1024
    activation: str = "gelu_tanh"
    norm_placement: str = "pre"
    layer_norm_eps: float = 1e-5
    init: str = "gpt2"
    # Tokens per chunk of the output projection + loss when GPT is given targets:
    # 0 = all logits at once; e.g. 4096 = never more than 4096 x vocab logits
    # alive (`cross_entropy.chunked_token_stats`). Same loss either way.
    loss_chunk: int = 0
    causal = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk!r} must be 0 (off) or a positive "
                             "number of tokens per chunk")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig(TransformerConfig):
    """The original Transformer (Vaswani et al. 2017, arXiv 1706.03762): post-LN,
    ReLU, sinusoidal positions, one vocabulary shared by source, target and output."""
    num_decoder_layers: int = 2
    activation: str = "relu"
    position: str = "sinusoidal"
    layer_norm_eps: float = 1e-6
    causal = False

    def __post_init__(self):
        super().__post_init__()
        # The decoder's self-attention is causal even though the encoder's is not.
        registry.validate(self.attention, causal=True, position=self.position,
                          attention_dropout=self.attention_dropout)
        positive_int("num_decoder_layers", self.num_decoder_layers)

    def decoder_config(self) -> "EncoderDecoderConfig":
        """This config with num_layers = num_decoder_layers: what the decoder stack reads."""
        return self.replace(num_layers=self.num_decoder_layers)


def _bert(layers, width, heads):
    # Turc et al. 2019 (arXiv 1908.08962) miniatures and the two original sizes.
    return BertConfig, dict(num_layers=layers, d_model=width, num_heads=heads, d_ff=4 * width)


def _gpt(layers, width, heads, max_len=1024):
    return GPTConfig, dict(num_layers=layers, d_model=width, num_heads=heads, d_ff=4 * width,
                           max_len=max_len, dropout=0.0, attention_dropout=0.0)


PRESETS = {
    "bert-tiny": _bert(2, 128, 2),
    "bert-mini": _bert(4, 256, 4),
    "bert-small": _bert(4, 512, 8),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
    "gpt-tiny": _gpt(2, 128, 4, max_len=256),
    "gpt2-small": _gpt(12, 768, 12),
    "gpt2-medium": _gpt(24, 1024, 16),
    "gpt2-large": _gpt(36, 1280, 20),
    "gpt2-xl": _gpt(48, 1600, 25),
    "transformer-tiny": (EncoderDecoderConfig, dict(
        num_layers=2, num_decoder_layers=2, d_model=128, num_heads=4, d_ff=512,
        vocab_size=1000, max_len=256)),
    "transformer-base": (EncoderDecoderConfig, dict(
        num_layers=6, num_decoder_layers=6, d_model=512, num_heads=8, d_ff=2048,
        vocab_size=37000, max_len=1024)),
}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset called `name`, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; valid: {', '.join(PRESETS)}")
    cls, fields = PRESETS[name]
    known_fields(cls, overrides, f"get_config({name!r})")
    if isinstance(overrides.get("attention"), dict):   # replace() reads AttentionConfig fields
        known_fields(AttentionConfig, overrides["attention"],
                           f"get_config({name!r}, attention=)")
    config = cls(**fields)
    return config.replace(**overrides) if overrides else config
