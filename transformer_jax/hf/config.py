"""Hugging Face `config.json` <-> our `BertConfig` / `GPTConfig`.

Every HF setting either maps to a field of ours exactly or is refused with the
setting's name: an approximated model would give silently different outputs.
Missing keys take the defaults of transformers' `BertConfig` / `GPT2Config`,
which is how transformers itself reads an old or sparse config.json.
"""
from __future__ import annotations

import warnings
from typing import Any

from transformer_jax.attention import registry
from transformer_jax.models import registry as families
from transformer_jax.models.configs import BertConfig, GPTConfig

# The HF classes each family maps onto (one list: the family registry's entries).
BERT_ARCHITECTURES = families.get_family("bert").hf_architectures
# The fine-tuning heads: a `classifier` Dense on the encoder, label metadata in config.json.
BERT_CLASSIFIERS = ("BertForSequenceClassification", "BertForTokenClassification")
GPT2_ARCHITECTURES = families.get_family("gpt").hf_architectures

# transformers' activation names (`transformers.activations.ACT2FN`) -> ours.
# gelu_new and gelu_pytorch_tanh are both the tanh approximation of
# Hendrycks & Gimpel 2016 (arXiv 1606.08415); "gelu" is the exact erf form.
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                      initializer_range=0.02, position_embedding_type="absolute",
                      is_decoder=False, add_cross_attention=False, tie_word_embeddings=True)
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
                      embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
                      initializer_range=0.02, scale_attn_weights=True,
                      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                      add_cross_attention=False, tie_word_embeddings=True)


def _require(hf: dict, key: str, supported, why: str) -> None:
    """Refuses `key` unless it has the one value this library implements; `why`
    says what the other values mean."""
    if hf.get(key) != supported:
        raise ValueError(f"config.json has {key}={hf.get(key)!r} ({why}); only {key}={supported!r} "
                         "is implemented, so the model is refused rather than approximated")


def _activation(hf: dict, key: str) -> str:
    name = hf[key]
    # A list or dict cannot be looked up (unhashable); it is refused like any unknown name.
    if not isinstance(name, str) or name not in ACTIVATIONS_FROM_HF:
        raise ValueError(f"config.json has {key}={name!r}; supported activations: "
                         f"{', '.join(map(repr, ACTIVATIONS_FROM_HF))}")
    return ACTIVATIONS_FROM_HF[name]


def architecture(hf: dict, valid: tuple[str, ...]) -> str | None:
    """The one supported entry of `architectures`, None when the key is absent."""
    names = hf.get("architectures")
    if not names:
        return None
    supported = [n for n in names if n in valid]
    if not supported:
        raise ValueError(f"config.json has architectures={names!r}; supported architectures: "
                         f"{', '.join(BERT_ARCHITECTURES + GPT2_ARCHITECTURES)}")
    return supported[0]


def _build(cls, hf_name: str, **fields):
    try:
        return cls(**fields)
    except ValueError as err:  # our validation names our field; say where it came from
        raise ValueError(f"{hf_name} config.json gives an invalid model: {err}") from err


def bert_from_hf(hf: dict, **overrides) -> BertConfig:
    """A HF BERT `config.json` dict -> BertConfig (ValueError on what we cannot represent)."""
    hf = {**_BERT_DEFAULTS, **hf}
    _require(hf, "position_embedding_type", "absolute",
             "relative_key(_query) are the relative positions of Shaw et al. 2018 / Huang et al. 2020")
    _require(hf, "is_decoder", False, "a causal BERT decoder")
    _require(hf, "add_cross_attention", False, "BERT with cross-attention")
    return _build(BertConfig, "BERT", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                  num_heads=hf["num_attention_heads"], num_layers=hf["num_hidden_layers"],
                  d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
                  dropout=hf["hidden_dropout_prob"],
                  attention_dropout=hf["attention_probs_dropout_prob"],
                  activation=_activation(hf, "hidden_act"), norm_placement="post",
                  layer_norm_eps=hf["layer_norm_eps"], type_vocab_size=hf["type_vocab_size"],
                  init_std=hf["initializer_range"], embedding_norm=True,
                  tie_embeddings=True, position="learned", **overrides)


def classifier_from_hf(hf: dict) -> dict:
    """The label fields of a HF BERT classifier `config.json` -> our head's fields
    {num_labels, labels, problem_type, classifier_dropout}, read as transformers'
    `PretrainedConfig` does: `id2label` decides the label count when present (JSON
    keys are strings), else `num_labels` (default 2). `labels` is None when the
    names are HF's defaults "LABEL_i", so a round trip keeps None."""
    id2label = hf.get("id2label")
    if id2label:
        try:
            ids = sorted(int(k) for k in id2label)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config.json has id2label keys {sorted(id2label)!r}; they must be "
                             "the label ids 0..num_labels-1") from err
        if ids != list(range(len(ids))):
            raise ValueError(f"config.json has id2label keys {ids}; they must be the label ids "
                             f"0..{len(ids) - 1}, one per logit")
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        _check_label2id(hf.get("label2id"), labels)
    else:
        count = 2 if hf.get("num_labels") is None else hf["num_labels"]
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"config.json has num_labels={count!r}; must be an int >= 1")
        labels = tuple(f"LABEL_{i}" for i in range(count))
    default = labels == tuple(f"LABEL_{i}" for i in range(len(labels)))
    return dict(num_labels=len(labels), labels=None if default else labels,
                problem_type=hf.get("problem_type"), classifier_dropout=hf.get("classifier_dropout"))


def _check_label2id(label2id, labels: tuple[str, ...]) -> None:
    """label2id is what id2label implies here (it is rebuilt on export): warn if it is not."""
    implied = {name: i for i, name in enumerate(labels)}
    if label2id and {k: int(v) for k, v in label2id.items()} != implied:
        warnings.warn(f"config.json has label2id={label2id!r}, not the inverse of id2label "
                      f"{implied!r}; id2label is used (as transformers' pipelines do) and "
                      "label2id is rebuilt from it on export", stacklevel=6)


def classifier_to_hf(head) -> dict:
    """Our classifier head's label fields -> HF config.json keys (`id2label` /
    `label2id` always written: "LABEL_i" when `head.labels` is None, as transformers
    writes them)."""
    labels = head.labels or tuple(f"LABEL_{i}" for i in range(head.num_labels))
    return dict(id2label={str(i): name for i, name in enumerate(labels)},
                label2id={name: i for i, name in enumerate(labels)},
                problem_type=head.problem_type, classifier_dropout=head.classifier_dropout)


def gpt2_from_hf(hf: dict, **overrides) -> GPTConfig:
    """A HF GPT-2 `config.json` dict -> GPTConfig (ValueError on what we cannot represent)."""
    if "n_ctx" in hf and "n_positions" not in hf:  # configs older than transformers 2.x
        hf = {**hf, "n_positions": hf["n_ctx"]}
    hf = {**_GPT2_DEFAULTS, **hf}
    _require(hf, "scale_attn_weights", True, "False drops the 1/sqrt(head_dim) logit scale")
    _require(hf, "scale_attn_by_inverse_layer_idx", False,
             "True scales attention logits by 1/(layer+1), from Stanford CRFM Mistral")
    _require(hf, "reorder_and_upcast_attn", False,
             "True reorders and upcasts attention, from Stanford CRFM Mistral")
    _require(hf, "add_cross_attention", False, "GPT-2 with cross-attention")
    # One dropout rate serves embeddings and residuals here; GPT-2 uses the
    # same value for both (0.1), and dropout never changes inference outputs.
    return _build(GPTConfig, "GPT-2", vocab_size=hf["vocab_size"], d_model=hf["n_embd"],
                  num_heads=hf["n_head"], num_layers=hf["n_layer"],
                  d_ff=hf["n_inner"] or 4 * hf["n_embd"], max_len=hf["n_positions"],
                  dropout=hf["resid_pdrop"], attention_dropout=hf["attn_pdrop"],
                  activation=_activation(hf, "activation_function"), norm_placement="pre",
                  layer_norm_eps=hf["layer_norm_epsilon"], init_std=hf["initializer_range"],
                  tie_embeddings=hf["tie_word_embeddings"], position="learned", **overrides)


def check_exportable(config, family: str) -> None:
    """Refuses configs an HF BERT / GPT-2 cannot express (the parameters alone
    would load, but the HF model would compute something else)."""
    placement = {"bert": "post", "gpt2": "pre"}[family]
    required: dict[str, Any] = dict(norm_placement=placement, norm_type="layernorm",
                                    position="learned", use_bias=True, embed_combine="add")
    if family == "bert":
        required.update(embedding_norm=True, tie_embeddings=True)
    for field, value in required.items():
        if getattr(config, field) != value:
            raise ValueError(f"config.{field}={getattr(config, field)!r} cannot be exported to an "
                             f"HF {family} checkpoint, which needs {field}={value!r}")
    if config.vocab_pad_multiple != 1:
        raise ValueError(f"config.vocab_pad_multiple={config.vocab_pad_multiple} pads the embedding "
                         f"table; HF {family} has exactly vocab_size rows. Slice the table to "
                         "vocab_size and export with vocab_pad_multiple=1")
    if config.num_kv_heads not in (None, config.num_heads):
        raise ValueError(f"config.num_kv_heads={config.num_kv_heads} (grouped-query attention) "
                         f"cannot be exported to HF {family}, which has num_heads key/value heads")
    if config.activation not in ACTIVATIONS_TO_HF:
        raise ValueError(f"config.activation={config.activation!r} cannot be exported; "
                         f"valid: {', '.join(map(repr, ACTIVATIONS_TO_HF))}")
    if config.scan_layers:
        raise ValueError("config.scan_layers=True stacks the layers' parameters; export "
                         "stacks.unstack_layers(params) with config.replace(scan_layers=False)")
    # Exact kernels only: the HF model computes full softmax attention.
    if not registry.get(config.attention.kind).exact:
        raise ValueError(f"config.attention.kind={config.attention.kind!r} approximates attention; "
                         "HF models compute it exactly. Export config.replace(attention="
                         "{'kind': 'xla'}) (same parameters) if that is what you mean")
    if family == "bert" and config.type_vocab_size < 1:
        raise ValueError(f"config.type_vocab_size={config.type_vocab_size} cannot be exported: "
                         "HF BERT always has token-type embeddings (use >= 1)")


def bert_to_hf(config: BertConfig, arch: str) -> dict:
    """BertConfig -> a HF BERT `config.json` dict for architecture `arch`."""
    check_exportable(config, "bert")
    return dict(architectures=[arch], model_type="bert", vocab_size=config.vocab_size,
                hidden_size=config.d_model, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, intermediate_size=config.d_ff,
                hidden_act=ACTIVATIONS_TO_HF[config.activation],
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.attention_dropout,
                max_position_embeddings=config.max_len, type_vocab_size=config.type_vocab_size,
                layer_norm_eps=config.layer_norm_eps, initializer_range=config.init_std,
                position_embedding_type="absolute", pad_token_id=0, tie_word_embeddings=True)


def gpt2_to_hf(config: GPTConfig, arch: str = "GPT2LMHeadModel") -> dict:
    """GPTConfig -> a HF GPT-2 `config.json` dict."""
    check_exportable(config, "gpt2")
    # bos/eos are vocabulary facts this config does not know; None keeps
    # transformers from assuming GPT-2's 50256 in a smaller vocabulary.
    return dict(architectures=[arch], model_type="gpt2", vocab_size=config.vocab_size,
                n_positions=config.max_len, n_embd=config.d_model, n_layer=config.num_layers,
                n_head=config.num_heads, n_inner=config.d_ff,
                activation_function=ACTIVATIONS_TO_HF[config.activation],
                resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layer_norm_eps,
                initializer_range=config.init_std, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                tie_word_embeddings=config.tie_embeddings, bos_token_id=None, eos_token_id=None)
