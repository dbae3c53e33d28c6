"""The architecture config shared by blocks and models.

One frozen dataclass; model families subclass it (`models/configs.py`) and name
presets there. Every field says why it exists. Validation happens at
construction, so a bad value fails where it enters, naming field and valid values.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from transformer_jax.attention import registry
from transformer_jax.attention.config import AttentionConfig
from transformer_jax.initializers import INIT_SCHEMES
from transformer_jax.normalization import NORM_PLACEMENTS, NORM_TYPES
from transformer_jax.positional import POSITION_KINDS
from transformer_jax.validation import (boolean, choice, known_fields, plain_scalars, positive_int,
                                        positive_number, probability)

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
EMBED_COMBINE = ("add", "concat")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a transformer stack: sizes, norm placement, positions, kernel,
    dtypes and the speed switches (remat, vocab padding, fused QKV, scanned layers).
    Frozen and hashable; validated on construction."""
    vocab_size: int = 1000
    d_model: int = 128
    num_heads: int = 2
    # Key/value heads: None = num_heads (MHA); 1 = multi-query (Shazeer 2019,
    # arXiv 1911.02150); in between = grouped-query (Ainslie et al. 2023).
    num_kv_heads: int | None = None
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    # post: Vaswani et al. 2017 / BERT; pre: GPT-2 / Xiong et al. 2020 (arXiv
    # 2002.04745); sandwich: Ding et al. 2021 (arXiv 2105.13290); deepnorm: Wang
    # et al. 2022 (arXiv 2203.00555).
    norm_placement: str = "post"
    norm_type: str = "layernorm"
    layer_norm_eps: float = 1e-12
    position: str = "learned"
    # How token and position embeddings meet: "add" (BERT/GPT) or "concat" then
    # a projection back to d_model (the description this project started from).
    embed_combine: str = "add"
    rope_base: float = 10000.0
    use_bias: bool = True
    # BERT/GPT-2 initialise weights from N(0, 0.02^2) (Devlin et al. 2018).
    init_std: float = 0.02
    # Initialisation scheme (`initializers.py`): "normal" = N(0, init_std^2) for
    # every matrix; "xavier" = Glorot & Bengio 2010 per matrix, as Xiong et al.
    # 2020 (arXiv 2002.04745); "small_init" = N(0, 2/(5d)) (Nguyen & Salazar 2019,
    # arXiv 1910.05895); "gpt2" = normal with the residual output projections scaled
    # by 1/sqrt(residual sub-layers) (Radford et al. 2019). init_std is read by
    # "normal" and "gpt2". DeepNorm blocks keep Xavier with gain beta whatever this says.
    init: str = "normal"
    # Output projection shares the token embedding matrix (Press & Wolf 2017).
    tie_embeddings: bool = True
    attention: AttentionConfig = AttentionConfig()
    dtype: str = "float32"         # compute dtype
    param_dtype: str = "float32"   # storage dtype of parameters (master weights)
    # Wrap parameter initializers in nn.with_logical_partitioning so that `init`
    # returns LogicallyPartitioned boxes naming each axis (`partitioning.py`).
    # Off by default: `model.init` gives plain arrays; the sharded path
    # (`transformer_jax.parallel`) turns it on only to read partition specs.
    logical_partitioning: bool = False
    # Recompute each block's activations in the backward pass instead of storing
    # them (Chen et al. 2016, arXiv 1604.06174): "none", "full" (store only block
    # inputs) or "dots" (also keep matmul outputs without batch dims). Same maths.
    remat: str = "none"
    # Round the embedding table up to a multiple of this (e.g. 128, as nanoGPT's
    # 50304) so the output matmul tiles evenly on accelerators; logits are sliced
    # back to vocab_size (masked inside GPT's loss), so the extra rows never reach
    # a prediction. 1 = no padding.
    vocab_pad_multiple: int = 1
    # Compute Q, K and V with one matmul (the kernels stay three parameters, so
    # checkpoints and imported weights are unaffected). Same maths.
    fused_qkv: bool = True
    # Run the layers with `nn.scan` over one block whose parameters carry a
    # leading `[num_layers]` axis (under `.../layers/...`): one layer is compiled
    # instead of L, which cuts compile time for deep models. Same maths; the
    # parameter tree differs (`stacks.stack_layers` converts).
    scan_layers: bool = False

    def __post_init__(self):
        plain_scalars(self)   # np.int64(64) -> 64: every subclass's fields, before any check
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_heads={self.num_heads} must be divisible by "
                                 f"num_kv_heads={self.num_kv_heads}")
        choice("activation", self.activation, ACTIVATIONS)
        choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        choice("norm_type", self.norm_type, NORM_TYPES)
        choice("position", self.position, POSITION_KINDS)
        choice("embed_combine", self.embed_combine, EMBED_COMBINE)
        choice("init", self.init, INIT_SCHEMES)
        if self.norm_placement == "deepnorm" and self.init == "small_init":
            # DeepNet's beta (Wang et al. 2022, arXiv 2203.00555) is derived for Xavier;
            # "normal" and "gpt2" differ from it only inside the blocks, which DeepNorm
            # replaces, small_init in the tables too.
            raise ValueError("init='small_init' does not apply to norm_placement='deepnorm', "
                             "whose blocks use Xavier with gain beta; choose init 'normal', "
                             "'gpt2' or 'xavier'")
        positive_number("init_std", self.init_std)
        positive_number("layer_norm_eps", self.layer_norm_eps)
        positive_number("rope_base", self.rope_base)
        choice("dtype", self.dtype, DTYPES)
        choice("param_dtype", self.param_dtype, DTYPES)
        probability("dropout", self.dropout)
        probability("attention_dropout", self.attention_dropout)
        choice("remat", self.remat, REMAT_POLICIES)
        positive_int("vocab_pad_multiple", self.vocab_pad_multiple)
        for name in ("use_bias", "tie_embeddings", "logical_partitioning", "fused_qkv",
                     "scan_layers"):
            boolean(name, getattr(self, name))
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {self.head_dim}")
        if self.embed_combine == "concat" and self.position not in ("learned", "sinusoidal"):
            raise ValueError(f"embed_combine='concat' needs position 'learned' or 'sinusoidal', "
                             f"got position={self.position!r}")
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(f"attention={self.attention!r} must be an AttentionConfig")
        registry.validate(self.attention, causal=self.causal, position=self.position,
                          attention_dropout=self.attention_dropout)

    # Subclasses override: whether self-attention in the main stack is causal.
    causal = False

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to vocab_pad_multiple: the rows of the embedding table."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        """d_model // num_heads."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        """`dtype` as a jnp dtype: activations and matmuls."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        """`param_dtype` as a jnp dtype: stored parameters."""
        return jnp.dtype(self.param_dtype)

    def replace(self, **kwargs):
        """Copy with fields changed; `attention=` may be a dict of AttentionConfig fields."""
        known_fields(type(self), kwargs, f"{type(self).__name__}.replace")
        if isinstance(kwargs.get("attention"), dict):
            kwargs["attention"] = self.attention.replace(**kwargs["attention"])
        return dataclasses.replace(self, **kwargs)
