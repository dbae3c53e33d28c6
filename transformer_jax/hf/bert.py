"""HF BERT <-> our BERT: which tensor goes where.

HF names (transformers `modeling_bert.py`), per layer i under `encoder.layer.{i}.`:
  attention.self.{query,key,value}   -> attention/{query,key,value}   heads_in
  attention.output.dense             -> attention/out                  heads_out
  attention.output.LayerNorm         -> attention_norm
  intermediate.dense / output.dense  -> mlp/up / mlp/down               dense
  output.LayerNorm                   -> mlp_norm
Heads of `BertForPreTraining`: `cls.predictions.{transform.dense, transform.LayerNorm,
bias}` -> `mlm_head/{transform, norm, bias}`, `cls.seq_relationship` -> `nsp_head`;
the MLM decoder weight is the word-embedding matrix (tied). The fine-tuning heads
`BertForSequenceClassification` (with the pooler) and `BertForTokenClassification`
(without) add `classifier` -> `classifier` (dense).
"""
from __future__ import annotations

from transformer_jax.hf import mapping as m
from transformer_jax.models.configs import BertConfig

# Buffers (not parameters) that some transformers versions save.
BUFFERS = (r"(bert\.)?embeddings\.position_ids", r"(bert\.)?embeddings\.token_type_ids")


def _encoder(config: BertConfig, hf: str, ours: str, pooler: bool) -> list[m.Entry]:
    """`hf`/`ours` are prefixes: "bert." / "bert/" inside a head model, "" alone."""
    emb, out = f"{hf}embeddings.", f"{ours}embeddings/"
    entries = [m.copy(f"{emb}word_embeddings.weight", f"{out}token/embedding"),
               m.copy(f"{emb}position_embeddings.weight", f"{out}position/embedding"),
               m.copy(f"{emb}token_type_embeddings.weight", f"{out}token_type/embedding")]
    entries += m.norm(f"{emb}LayerNorm", f"{out}norm")
    for i in range(config.num_layers):
        src, dst = f"{hf}encoder.layer.{i}.", f"{ours}encoder/layer_{i}/"
        for name in ("query", "key", "value"):
            entries += m.heads_in(f"{src}attention.self.{name}", f"{dst}attention/{name}",
                                  config.num_heads)
        entries += m.heads_out(f"{src}attention.output.dense", f"{dst}attention/out", config.num_heads)
        entries += m.norm(f"{src}attention.output.LayerNorm", f"{dst}attention_norm")
        entries += m.dense(f"{src}intermediate.dense", f"{dst}mlp/up")
        entries += m.dense(f"{src}output.dense", f"{dst}mlp/down")
        entries += m.norm(f"{src}output.LayerNorm", f"{dst}mlp_norm")
    if pooler:
        entries += m.dense(f"{hf}pooler.dense", f"{ours}pooler")
    return entries


def _mlm_head(hf_encoder: str) -> tuple[list[m.Entry], list[tuple[str, str]]]:
    p = "cls.predictions."
    entries = (m.dense(f"{p}transform.dense", "mlm_head/transform")
               + m.norm(f"{p}transform.LayerNorm", "mlm_head/norm")
               + [m.copy(f"{p}bias", "mlm_head/bias")])
    # Older checkpoints also store the decoder, tied to the word embeddings and bias.
    tied = [(f"{p}decoder.weight", f"{hf_encoder}embeddings.word_embeddings.weight"),
            (f"{p}decoder.bias", f"{p}bias")]
    return entries, tied


def layout(config: BertConfig, *, heads: tuple[str, ...] = (), hf_prefix: str, ours_prefix: str,
           pooler: bool, skip: tuple[str, ...] = ()) -> m.Layout:
    """The HF <-> ours map of a BERT: HF `nn.Linear` weights `[out, in]` become kernels
    `[in, out]`, attention projections `[H*hd, d]` become `[d, H, hd]` (output
    `[d, H*hd]` -> `[H, hd, d]`). `heads` among "mlm", "nsp", "classifier". `hf_prefix` is "bert."
    (head models) or "" (a `BertModel` saved alone); `ours_prefix` is "bert/" in our
    head and sentence models, "" for a bare `BertModel`."""
    entries = _encoder(config, hf_prefix, ours_prefix, pooler)
    tied: list[tuple[str, str]] = []
    if "mlm" in heads:
        head, tied = _mlm_head(hf_prefix)
        entries += head
    if "nsp" in heads:
        entries += m.dense("cls.seq_relationship", "nsp_head")
    if "classifier" in heads:
        entries += m.dense("classifier", "classifier")
    return m.Layout(tuple(entries), tuple(tied), BUFFERS + skip)


def hf_prefix(names, arch: str) -> str:
    """"bert." when the encoder tensors (`names`, the file's tensor names) carry it, as
    in every head model; "" for a `BertModel` saved alone."""
    if arch != "BertModel" or any(n.startswith("bert.") for n in names):
        return "bert."
    return ""


def rename_legacy(tensors: dict) -> dict:
    """TF-converted checkpoints call LayerNorm parameters gamma/beta; transformers
    renames them on load, and so do we ({name: array} -> {name: array}, arrays as is)."""
    def fix(name):
        if ".LayerNorm." in name or name.startswith("LayerNorm."):
            return name.replace(".gamma", ".weight").replace(".beta", ".bias")
        return name
    return {fix(k): v for k, v in tensors.items()}
