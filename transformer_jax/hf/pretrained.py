"""`load_pretrained` and `save_pretrained`: HF BERT / GPT-2 checkpoint directories
(config.json + model.safetensors [+ tokenizer] [+ sentence-transformers pipeline])
to our models and back.

Import builds our model from config.json, derives every expected tensor shape from
it, checks the file against them (all problems reported at once, by tensor name),
and converts. Export runs the same layout backwards, so a round trip is lossless.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from transformer_jax.hf import bert, gpt2, io, mapping, sentence
from transformer_jax.hf import config as config_lib
from transformer_jax.hf.tokenizer import load_tokenizer
from transformer_jax.models.bert import (BertForMaskedLM, BertForPreTraining,
                                         BertForSentenceEmbedding, BertForSequenceClassification,
                                         BertForTokenClassification, BertModel)
from transformer_jax.models.configs import BertConfig, GPTConfig
from transformer_jax.models.gpt import GPT
from transformer_jax.validation import is_int, require

SENTENCE_TRANSFORMER = "SentenceTransformer"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An imported checkpoint: `model.apply({"params": params}, input_ids [batch, seq],
    ...)` gives what the HF model would (logits, hidden states or sentence vectors)."""
    model: nn.Module         # BertModel, BertForPreTraining, BertForMaskedLM,
                             # BertForSequenceClassification, BertForTokenClassification,
                             # BertForSentenceEmbedding or GPT
    params: Any              # the "params" collection of `model`
    config: BertConfig | GPTConfig
    tokenizer: Any           # tokenizers.Tokenizer, or None if the directory has none
    kind: str                # the HF architecture, or "SentenceTransformer"
    pooling: sentence.SentencePooling | None  # sentence-transformers pipeline
    hf_config: dict = dataclasses.field(default_factory=dict)
    unused: tuple[str, ...] = ()  # tensors in the file this model does not use

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """Last-layer token vectors `[batch, seq, d_model]` (BERT: before any head;
        GPT: after the final LayerNorm)."""
        if isinstance(self.config, GPTConfig):
            return _gpt_hidden(self.model)(self.params, input_ids, attention_mask)
        encoder = self.params.get("bert", self.params)
        encoder = {k: v for k, v in encoder.items() if k != "pooler"}
        return _bert_hidden(self.config)(encoder, input_ids, attention_mask, token_type_ids)

    def save(self, directory) -> Path:
        """`save_pretrained(directory, self.model, self.params, tokenizer=...)`, keeping a
        sentence-transformers pipeline's max_seq_length (e.g. 256 of 512 positions)."""
        max_seq_length = self.pooling.max_seq_length if self.pooling is not None else None
        return save_pretrained(directory, self.model, self.params, tokenizer=self.tokenizer,
                               max_seq_length=max_seq_length)


@functools.lru_cache(maxsize=8)
def _bert_hidden(config):
    module = BertModel(config, add_pooler=False)
    return jax.jit(lambda p, ids, mask, types: module.apply({"params": p}, ids, types, mask)[0])


@functools.lru_cache(maxsize=8)
def _gpt_hidden(module):
    return jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, attention_mask=mask,
                                                     method="hidden"))


# HF classifier architecture -> (our head, whether it has the pooler). As in
# transformers: sequence classification reads the pooled [CLS]
# (`BertModel(config)`), token classification the sequence output
# (`BertModel(config, add_pooling_layer=False)`).
_CLASSIFIERS = {"BertForSequenceClassification": (BertForSequenceClassification, True),
                "BertForTokenClassification": (BertForTokenClassification, False)}


def _bert_classifier(arch: str, hf: dict, config: BertConfig):
    """(model, layout, kind) of a BERT fine-tuning head; its label fields
    (num_labels, id2label, problem_type, classifier_dropout) come from config.json."""
    cls, pooler = _CLASSIFIERS[arch]
    try:
        model = cls(config, **config_lib.classifier_from_hf(hf))
    except ValueError as err:  # our head names its field; say where it came from
        raise ValueError(f"BERT config.json gives an invalid {arch}: {err}") from err
    return model, bert.layout(config, heads=("classifier",), hf_prefix="bert.",
                              ours_prefix="bert/", pooler=pooler), arch


def _bert_model(hf: dict, tensors: dict, pooling, overrides):
    """(model, layout, kind) of a BERT checkpoint."""
    arch = config_lib.architecture(hf, config_lib.BERT_ARCHITECTURES)
    if arch is None:  # old config.json without `architectures`: read the heads off the tensors
        arch = ("BertForPreTraining" if "cls.seq_relationship.weight" in tensors else
                "BertForMaskedLM" if any(n.startswith("cls.predictions.") for n in tensors) else
                "BertModel")
    config = config_lib.bert_from_hf(hf, **overrides)
    prefix = bert.hf_prefix(tensors, arch)
    if pooling is not None:
        # sentence-transformers uses only the encoder's token vectors.
        skip = (r"(bert\.)?pooler\.dense\.(weight|bias)", r"cls\..*")
        return (BertForSentenceEmbedding(config, pooling=pooling.mode, normalize=pooling.normalize),
                bert.layout(config, hf_prefix=prefix, ours_prefix="bert/", pooler=False, skip=skip),
                SENTENCE_TRANSFORMER)
    if arch in _CLASSIFIERS:  # no decoder, so tie_word_embeddings does not matter
        return _bert_classifier(arch, hf, config)
    if arch != "BertModel" and not hf.get("tie_word_embeddings", True):
        raise ValueError("config.json has tie_word_embeddings=False; this library's MLM head "
                         "always shares the word-embedding matrix")
    if arch == "BertModel":
        pooler = f"{prefix}pooler.dense.weight" in tensors
        return (BertModel(config, add_pooler=pooler),
                bert.layout(config, hf_prefix=prefix, ours_prefix="", pooler=pooler), arch)
    if arch == "BertForMaskedLM":
        return (BertForMaskedLM(config), bert.layout(config, heads=("mlm",), hf_prefix=prefix,
                                                     ours_prefix="bert/", pooler=False), arch)
    return (BertForPreTraining(config), bert.layout(config, heads=("mlm", "nsp"), hf_prefix=prefix,
                                                    ours_prefix="bert/", pooler=True), arch)


def _gpt2_model(hf: dict, tensors: dict, pooling, overrides):
    if pooling is not None:
        raise ValueError("sentence-transformers pipelines are supported for BERT only, not GPT-2")
    arch = config_lib.architecture(hf, config_lib.GPT2_ARCHITECTURES)
    prefix = gpt2.hf_prefix(tensors)
    if arch is None:
        arch = "GPT2LMHeadModel" if prefix or "lm_head.weight" in tensors else "GPT2Model"
    if arch == "GPT2Model" and not hf.get("tie_word_embeddings", True):
        hf = _untied_base_model(hf)
    config = config_lib.gpt2_from_hf(hf, **overrides)
    # GPT2Model has no head; with tied embeddings its logits through them are
    # exactly those of the GPT2LMHeadModel it was trained in.
    return GPT(config), gpt2.layout(config, hf_prefix=prefix), arch


def _untied_base_model(hf: dict) -> dict:
    """A `GPT2Model` with tie_word_embeddings=False has no LM head in its file (HF
    loads it as the bare transformer). It is imported tied (tie_embeddings=True),
    so nothing is invented: the params are exactly the file's, `hidden_states`
    matches HF's `last_hidden_state`, and `model.apply` logits read through `wte`,
    which are not the logits of the separate head this model was trained with."""
    warnings.warn("config.json has architectures=['GPT2Model'] with tie_word_embeddings=False: "
                  "the file has no LM head, so it is imported with tie_embeddings=True. "
                  "Pretrained.hidden_states() matches HF's last_hidden_state; model.apply "
                  "logits go through the token embeddings, not the untied head this model was "
                  "trained with", stacklevel=4)
    return {**hf, "tie_word_embeddings": True}


_FAMILIES = {"bert": _bert_model, "gpt2": _gpt2_model}


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise ValueError(f"{directory} has no config.json; a Hugging Face checkpoint directory "
                         "needs config.json next to model.safetensors")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    family = hf.get("model_type")
    if family is None:  # very old configs: the family is the architecture's prefix
        archs = hf.get("architectures") or [""]
        family = "bert" if archs[0].startswith("Bert") else "gpt2" if archs[0].startswith("GPT2") else None
        hf = {**hf, "model_type": family} if family else hf
    if not isinstance(family, str) or family not in _FAMILIES:  # a list would be unhashable
        arch = hf.get("architectures")
        raise ValueError(f"{path} has model_type={family!r} (architectures={arch!r}); supported: "
                         f"model_type 'bert' ({', '.join(config_lib.BERT_ARCHITECTURES)}) or "
                         f"'gpt2' ({', '.join(config_lib.GPT2_ARCHITECTURES)})")
    return hf


def expected_shapes(model: nn.Module) -> dict:
    """Our parameter shapes and dtypes, {"/"-joined path: ShapeDtypeStruct} (e.g.
    "bert/embeddings/token/embedding": `[vocab, d]`), without allocating."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    return flatten_dict(shapes, sep="/")


def load_pretrained(path, *, allow_pickle: bool = False, strict: bool = False,
                    dtype: str = "float32", param_dtype: str = "float32") -> Pretrained:
    """Imports an HF BERT / GPT-2 / sentence-transformers directory: every tensor's
    shape is checked against config.json (all problems reported together) and
    converted to our layout (e.g. weights `[out, in]` -> kernels `[in, out]`).

    allow_pickle: read `pytorch_model.bin` when there is no safetensors file (a
      pickle can run code: only for files you trust; needs torch).
    strict: tensors the model does not use are an error (default: a warning).
    dtype / param_dtype: our compute and parameter dtypes."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; pass a checkpoint directory holding "
                         "config.json and model.safetensors")
    pooling = sentence.read_pipeline(directory)
    model_dir = pooling.transformer_dir if pooling else directory
    hf = _read_config(model_dir)
    tensors, source = io.read_checkpoint(model_dir, allow_pickle=allow_pickle)
    if hf["model_type"] == "bert":
        tensors = bert.rename_legacy(tensors)
    overrides = dict(dtype=dtype, param_dtype=param_dtype)
    model, layout, kind = _FAMILIES[hf["model_type"]](hf, tensors, pooling, overrides)
    flat, unused = mapping.import_params(layout, tensors, expected_shapes(model), strict=strict,
                                         source=str(source))
    max_length = model.config.max_len
    if pooling is not None and pooling.max_seq_length:
        max_length = min(max_length, pooling.max_seq_length)
    return Pretrained(model=model, params=unflatten_dict(flat, sep="/"), config=model.config,
                      tokenizer=load_tokenizer(model_dir, max_length), kind=kind, pooling=pooling,
                      hf_config=hf, unused=tuple(unused))


def _export_spec(model: nn.Module):
    """(HF config dict, layout) for one of our models."""
    cfg = model.config
    if isinstance(model, GPT):
        return config_lib.gpt2_to_hf(cfg), gpt2.layout(cfg, hf_prefix="transformer.")
    specs = {BertModel: ("BertModel", (), "", "", getattr(model, "add_pooler", False)),
             BertForSentenceEmbedding: ("BertModel", (), "", "bert/", False),
             BertForMaskedLM: ("BertForMaskedLM", ("mlm",), "bert.", "bert/", False),
             BertForPreTraining: ("BertForPreTraining", ("mlm", "nsp"), "bert.", "bert/", True),
             **{cls: (arch, ("classifier",), "bert.", "bert/", pooler)
                for arch, (cls, pooler) in _CLASSIFIERS.items()}}
    if type(model) not in specs:
        raise ValueError(f"cannot export a {type(model).__name__}; supported: GPT, "
                         f"{', '.join(c.__name__ for c in specs)}")
    arch, heads, hf_prefix, ours_prefix, pooler = specs[type(model)]
    hf_config = config_lib.bert_to_hf(cfg, arch)
    if arch in config_lib.BERT_CLASSIFIERS:
        hf_config.update(config_lib.classifier_to_hf(model))
    return (hf_config,
            bert.layout(cfg, heads=heads, hf_prefix=hf_prefix, ours_prefix=ours_prefix, pooler=pooler))


def _sentence_max_length(model: nn.Module, max_seq_length) -> int:
    """The max_seq_length a sentence-transformers pipeline is saved with: the given
    one (what it was imported with), else every position the model has."""
    if max_seq_length is None:
        return model.config.max_len
    max_len = model.config.max_len
    require("max_seq_length", is_int(max_seq_length) and 1 <= max_seq_length <= max_len,
            max_seq_length, f"an int in [1, max_len={max_len}] (the model's positions)")
    return max_seq_length


def save_pretrained(directory, model: nn.Module, params, *, tokenizer=None, dtype=None,
                    max_seq_length: int | None = None) -> Path:
    """Writes `config.json` + `model.safetensors` in the HF layout (plus
    `tokenizer.json`, and the sentence-transformers files for
    `BertForSentenceEmbedding`). `params` is the "params" collection (or the
    variables dict holding it); `dtype` casts the saved tensors (default: as is);
    `max_seq_length` is the sentence-transformers truncation length (default:
    config.max_len; sentence models only)."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    hf_config, layout = _export_spec(model)
    if max_seq_length is not None and not isinstance(model, BertForSentenceEmbedding):
        raise ValueError(f"max_seq_length={max_seq_length!r} applies to a sentence-transformers "
                         f"pipeline (BertForSentenceEmbedding), not a {type(model).__name__}")
    if isinstance(model, BertForSentenceEmbedding):  # checked before anything is written
        max_seq_length = _sentence_max_length(model, max_seq_length)
    tensors = mapping.export_params(layout, flatten_dict(params, sep="/"), dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    io.write_safetensors(directory / io.SAFETENSORS, tensors)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:   # a `tokenizers.Tokenizer`, or our `data.Tokenizer` around one
        getattr(tokenizer, "backend", tokenizer).save(str(directory / "tokenizer.json"))
    if isinstance(model, BertForSentenceEmbedding):
        sentence.write_pipeline(directory, model.pooling, model.normalize, model.config.d_model,
                                max_seq_length)
    if (directory / io.PICKLE).exists():
        warnings.warn(f"{directory / io.PICKLE} is left in place; {io.SAFETENSORS} takes precedence")
    return directory
