"""BERT (Devlin et al. 2018, arXiv 1810.04805) and its downstream heads.

Parameter tree: `bert/{embeddings, encoder, pooler}` is exactly HF's `BertModel`
(109,482,240 parameters for bert-base); pretraining adds `mlm_head` and `nsp_head`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import initializers, partitioning as logical, validation
from transformer_jax.blocks import ACTIVATION_FNS
from transformer_jax.embeddings import Embeddings, check_ids
from transformer_jax.models.common import check_length, key_padding_mask
from transformer_jax.models.configs import BertConfig
from transformer_jax.normalization import make_norm
from transformer_jax.stacks import Encoder


def _dense(cfg, features, name, **kw):
    # [d_model, features]: sharded over the input width only (heads are small).
    kernel_init = logical.param_init(initializers.kernel_init(cfg.init, cfg.init_std, cfg.d_model),
                                     (logical.EMBED, None), cfg.logical_partitioning)
    bias_init = logical.param_init(nn.initializers.zeros, (None,), cfg.logical_partitioning)
    return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init,
                    dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name, **kw)


class BertModel(nn.Module):
    """input_ids `[..., seq]` -> (sequence output `[..., seq, d]`, pooled `[..., d]`).

    attention_mask `[..., seq]`: True/1 on real tokens. token_type_ids `[..., seq]`:
    0 for segment A, 1 for segment B."""
    config: BertConfig
    add_pooler: bool = True

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg, type_vocab_size=cfg.type_vocab_size,
                                     use_norm=cfg.embedding_norm)
        self.encoder = Encoder(cfg, arch="encoder")
        if self.add_pooler:
            self.pooler = _dense(cfg, cfg.d_model, "pooler")

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *,
                 deterministic=True, sow_weights=False, **kernel_kwargs):
        check_length(input_ids, self.config.max_len)
        mask = key_padding_mask(attention_mask, input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        x = self.encoder(x, mask, deterministic=deterministic, sow_weights=sow_weights,
                         **kernel_kwargs)
        # The pooler reads the [CLS] position (Devlin et al. 2018, sec. 3).
        pooled = jnp.tanh(self.pooler(x[..., 0, :])) if self.add_pooler else None
        return x, pooled


class MLMHead(nn.Module):
    """transform (dense + activation + LayerNorm) then the tied token matrix + bias."""
    config: BertConfig

    @nn.compact
    def __call__(self, x, embeddings: Embeddings):
        cfg = self.config
        x = ACTIVATION_FNS[cfg.activation](_dense(cfg, cfg.d_model, "transform")(x))
        x = make_norm(cfg.norm_type, cfg.layer_norm_eps, cfg.compute_dtype, cfg.params_dtype, "norm")(x)
        bias = self.param("bias", logical.param_init(nn.initializers.zeros, (logical.VOCAB,),
                                                     cfg.logical_partitioning),
                          (cfg.vocab_size,), cfg.params_dtype)
        return embeddings.attend(x) + bias.astype(cfg.compute_dtype)


class BertForPreTraining(nn.Module):
    """Masked LM + next-sentence prediction. Returns {"mlm_logits", "nsp_logits"}.

    With `mlm_positions [..., P]`, the MLM head runs only at those positions
    (`mlm_logits [..., P, vocab]`), as in Devlin et al.'s code: the vocabulary
    projection is the costliest matmul and most positions are not predicted."""
    config: BertConfig

    def setup(self):
        self.bert = BertModel(self.config)
        self.mlm_head = MLMHead(self.config)
        self.nsp_head = _dense(self.config, 2, "nsp_head")

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, mlm_positions=None,
                 *, deterministic=True, sow_weights=False, **kernel_kwargs):
        x, pooled = self.bert(input_ids, token_type_ids, attention_mask, deterministic=deterministic,
                              sow_weights=sow_weights, **kernel_kwargs)
        if mlm_positions is not None:
            seq = input_ids.shape[-1]
            check_ids("mlm_positions", mlm_positions, seq, f"the sequence length {seq}")
            # Traced positions outside [0, seq) read NaN rows (as `embeddings.lookup`
            # does for ids), where take_along_axis alone would wrap -1 to the last one.
            ok = (mlm_positions >= 0) & (mlm_positions < seq)
            x = jnp.take_along_axis(x, jnp.where(ok, mlm_positions, 0)[..., None], axis=-2)
            x = jnp.where(ok[..., None], x, jnp.nan).astype(x.dtype)
        return {"mlm_logits": self.mlm_head(x, self.bert.embeddings),
                "nsp_logits": self.nsp_head(pooled)}


class BertForMaskedLM(nn.Module):
    """Masked LM only (HF `BertForMaskedLM`: no pooler). Returns logits `[..., seq, vocab]`."""
    config: BertConfig

    def setup(self):
        self.bert = BertModel(self.config, add_pooler=False)
        self.mlm_head = MLMHead(self.config)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic=True):
        x, _ = self.bert(input_ids, token_type_ids, attention_mask, deterministic=deterministic)
        return self.mlm_head(x, self.bert.embeddings)


class BertForSequenceClassification(nn.Module):
    """pooled [CLS] -> dropout -> logits `[..., num_labels]` (HF `BertForSequenceClassification`).

    labels: the name of each logit (HF `id2label`), None for HF's "LABEL_i".
    problem_type: how the logits are trained and read, as HF's field: None,
      "single_label_classification" (softmax + cross-entropy),
      "multi_label_classification" (a sigmoid per label) or "regression" (raw values);
      metadata only, the logits are the same for each.
    classifier_dropout: dropout before the classifier; None uses config.dropout
      (HF: classifier_dropout, else hidden_dropout_prob)."""
    config: BertConfig
    num_labels: int = 2
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None

    PROBLEM_TYPES = (None, "single_label_classification", "multi_label_classification",
                     "regression")

    def __post_init__(self):
        super().__post_init__()
        self.check_head(self, self.PROBLEM_TYPES)

    @staticmethod
    def check_head(head, problem_types) -> None:
        """ValueError naming the field when num_labels, labels, problem_type or
        classifier_dropout of a classifier `head` are inconsistent or invalid."""
        name = type(head).__name__
        validation.plain_scalars(head)   # np.int64(3) labels, as the configs take them
        if not validation.is_int(head.num_labels) or head.num_labels < 1:
            raise ValueError(f"{name}: num_labels={head.num_labels!r}; must be an int >= 1")
        if head.labels is not None and (not isinstance(head.labels, (tuple, list)) or not all(
                isinstance(label, str) for label in head.labels)):
            raise ValueError(f"{name}: labels={head.labels!r}; must be None or a tuple of "
                             "label names (str), one per label")
        if head.labels is not None and len(head.labels) != head.num_labels:
            raise ValueError(f"{name}: labels has {len(head.labels)} names {head.labels!r} but "
                             f"num_labels={head.num_labels}; give one name per label")
        if head.problem_type not in problem_types:
            raise ValueError(f"{name}: problem_type={head.problem_type!r}; valid: "
                             f"{', '.join(map(repr, problem_types))}")
        if head.problem_type == "single_label_classification" and head.num_labels == 1:
            raise ValueError(f"{name}: problem_type='single_label_classification' needs "
                             "num_labels >= 2 (one label is problem_type='regression')")
        rate = head.classifier_dropout
        if rate is not None:
            validation.probability(f"{name}: classifier_dropout", rate)

    @nn.compact
    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic=True):
        _, pooled = BertModel(self.config, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic)
        rate = self.config.dropout if self.classifier_dropout is None else self.classifier_dropout
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        return _dense(self.config, self.num_labels, "classifier")(pooled)


class BertForTokenClassification(nn.Module):
    """Per-token logits `[..., seq, num_labels]` (e.g. NER tags) from the sequence
    output, no pooler (HF `BertForTokenClassification`). labels and
    classifier_dropout as in `BertForSequenceClassification`; problem_type only
    None or "single_label_classification": HF trains this head with per-token
    cross-entropy whatever its config says, so other values would name an
    objective the head does not have."""
    config: BertConfig
    num_labels: int = 9
    labels: tuple[str, ...] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None

    PROBLEM_TYPES = (None, "single_label_classification")

    def __post_init__(self):
        super().__post_init__()
        BertForSequenceClassification.check_head(self, self.PROBLEM_TYPES)

    @nn.compact
    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic=True):
        x, _ = BertModel(self.config, add_pooler=False, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic)
        rate = self.config.dropout if self.classifier_dropout is None else self.classifier_dropout
        x = nn.Dropout(rate)(x, deterministic=deterministic)
        return _dense(self.config, self.num_labels, "classifier")(x)


def pool(hidden, attention_mask, mode: str):
    """Sentence vector from `[..., seq, d]`: "cls" (first token) or "mean" over the
    real tokens only (Reimers & Gurevych 2019, arXiv 1908.10084)."""
    if mode == "cls":
        return hidden[..., 0, :]
    if mode != "mean":
        raise ValueError(f"pooling={mode!r} is not valid; choose 'cls' or 'mean'")
    if attention_mask is None:
        return hidden.astype(jnp.float32).mean(-2)
    w = jnp.asarray(attention_mask, jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * w).sum(-2) / jnp.maximum(w.sum(-2), 1e-9)


class BertForSentenceEmbedding(nn.Module):
    """Sentence embeddings `[..., d]`, optionally L2-normalised (sentence-transformers)."""
    config: BertConfig
    pooling: str = "mean"
    normalize: bool = True

    @nn.compact
    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic=True):
        x, _ = BertModel(self.config, add_pooler=False, name="bert")(
            input_ids, token_type_ids, attention_mask, deterministic=deterministic)
        v = pool(x, attention_mask, self.pooling)
        if self.normalize:
            v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        return v
