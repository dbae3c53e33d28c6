"""Fine-tuning through the run layer and the command line: `train --task classify |
tag` on labeled files the test writes, metrics well above chance on held-out data,
`predict`, `--init` from a pre-trained run, and refusals of bad files before
anything is written."""
import json
import random
import re

import chex
import pytest

from transformer_jax.run.cli import main
from transformer_jax.run.config import RunConfig
from transformer_jax.run.loop import train

TINY = (("num_layers", 1), ("d_model", 32), ("num_heads", 2), ("d_ff", 64))
TOPICS = {"math": ["sum", "root", "prime", "angle"], "files": ["path", "open", "read", "disk"],
          "web": ["url", "http", "socket", "host"]}
FILLER = "the a of to and is it that for with on this as by be are from".split()


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _classify_records(n, seed):
    # One topic word among filler words decides the label: learnable, not trivial.
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[label]))
        out.append({"text": " ".join(words), "label": label})
    return out


KEYWORDS = ["def", "return", "if", "else", "for", "in", "import", "while"]
NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "zeta", "lambda_"]


def _tag_records(n, seed):
    # Keywords are B-KW, other words B-NAME, punctuation O.
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 10)):
            kind = rng.random()
            if kind < 0.4:
                tokens.append(rng.choice(KEYWORDS)), tags.append("B-KW")
            elif kind < 0.8:
                tokens.append(rng.choice(NAMES)), tags.append("B-NAME")
            else:
                tokens.append(rng.choice("():,=")), tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def _run(tmp_path, task, train_path, dev_path, steps, **kw):
    return RunConfig(**{**dict(model="bert-tiny", task=task, data=str(train_path),
                               eval_data=str(dev_path), vocab_size=200, seq_len=24, batch_size=16,
                               steps=steps, warmup=10, lr=3e-3, eval_every=steps, save_every=steps,
                               peak_tflops=1.0, overrides=TINY, out_dir=str(tmp_path / task)), **kw})


@pytest.mark.slow
def test_classify_learns_and_predicts(tmp_path, capsys):
    train_path = _write(tmp_path / "train.jsonl", _classify_records(300, 0))
    dev_path = _write(tmp_path / "dev.jsonl", _classify_records(60, 1))
    summary = train(_run(tmp_path, "classify", train_path, dev_path, 150), progress=False)
    metrics = summary["final_val_metrics"]
    assert summary["status"] == "completed"
    assert metrics["accuracy"] > 0.8 and metrics["macro_f1"] > 0.8, metrics   # chance: 1/3
    assert json.loads((tmp_path / "classify" / "labels.json").read_text())["labels"] == sorted(TOPICS)
    texts = ["the prime of a sum", "open the path on disk", "a socket to the host"]
    args = ["predict", "--model", str(tmp_path / "classify")] + [a for t in texts for a in ("--text", t)]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["math", "files", "web"]
    assert all(1 / 3 < r["probability"] <= 1 for r in rows)
    # The checkpoint holds the label set it was trained with: a labels.json edited since
    # (another order would swap the predictions silently, another count fail as a shape
    # mismatch) is refused by name, by predict and by --resume; restored, it works again.
    labels_file = tmp_path / "classify" / "labels.json"
    original = labels_file.read_text()
    for edited in (sorted(TOPICS)[::-1], sorted(TOPICS) + ["extra"]):
        labels_file.write_text(json.dumps({"task": "classify", "labels": edited}))
        for argv in (args, ["train", "--out", str(tmp_path / "classify"), "--resume"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"label file '{labels_file}' holds {edited}, but the checkpoint was trained " \
                   f"with {sorted(TOPICS)}" in err and err.count("\n") == 1, err
    labels_file.write_text(original)
    assert main(args) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == \
        ["math", "files", "web"]


@pytest.mark.slow
def test_tag_learns_entities_and_predicts_words(tmp_path, capsys):
    train_path = _write(tmp_path / "train.jsonl", _tag_records(300, 2))
    dev_path = _write(tmp_path / "dev.jsonl", _tag_records(60, 3))
    summary = train(_run(tmp_path, "tag", train_path, dev_path, 150), progress=False)
    metrics = summary["final_val_metrics"]
    assert metrics["accuracy"] > 0.9 and metrics["entity_f1"] > 0.8, metrics
    inputs = _write(tmp_path / "in.jsonl", [{"tokens": ["def", "alpha", "(", "beta", ")"]}])
    assert main(["predict", "--model", str(tmp_path / "tag"), "--input-file", str(inputs)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tags"] == ["B-KW", "B-NAME", "O", "B-NAME", "O"] and not err
    # Longer than the run's --seq-len 24: every word gets a tag, and the cut is said.
    words = (["def", "alpha", "(", "beta", ")"] * 6)[:28]
    long = _write(tmp_path / "long.jsonl", [{"tokens": words}])
    assert main(["predict", "--model", str(tmp_path / "tag"), "--input-file", str(long)]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["tags"]) == 28
    assert "note: 1 input(s) (first: number 1) have more than 22 word pieces" in err, err
    # A string of tokens would be tagged character by character, and a pair has no
    # meaning for a tagger: both refused in one line, as training refuses the first.
    as_string = _write(tmp_path / "string.jsonl", [{"tokens": "def alpha"}])
    for argv, expect in (
            (["--input-file", str(as_string)], f"{as_string}':1: field 'tokens' must be list, got str 'def alpha'"),
            (["--text", "def alpha", "--text-pair", "beta"], "--text-pair 'beta': --model")):
        assert main(["predict", "--model", str(tmp_path / "tag"), *argv]) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.slow
def test_init_from_a_pretrained_run_loads_the_encoder(tmp_path, capsys):
    from transformer_jax.run.loading import load_run
    pre = tmp_path / "pre"
    train(RunConfig(model="bert-tiny", task="mlm", max_documents=30, vocab_size=300, seq_len=32,
                    batch_size=8, steps=4, warmup=1, eval_every=4, save_every=4, peak_tflops=1.0,
                    overrides=TINY, out_dir=str(pre)), progress=False)
    train_path = _write(tmp_path / "train.jsonl", _classify_records(40, 4))
    dev_path = _write(tmp_path / "dev.jsonl", _classify_records(16, 5))
    # lr ~ 0: after two updates the encoder must still be the pre-trained one.
    train(_run(tmp_path, "classify", train_path, dev_path, 2, init=str(pre), lr=1e-12, warmup=1),
          progress=True)
    assert "--init: the encoder of run directory" in capsys.readouterr().out
    _, pre_params, pre_tok, _ = load_run(pre)
    _, params, tok, _ = load_run(tmp_path / "classify")
    assert tok.vocab_size == pre_tok.vocab_size   # the pre-trained tokenizer is used
    for name in ("embeddings", "encoder"):
        chex.assert_trees_all_close(pre_params["bert"][name], params["bert"][name], atol=1e-6)
    # The same pre-trained model exported as a Hugging Face directory works as --init too.
    pytest.importorskip("safetensors")
    from transformer_jax.hf import save_pretrained
    from transformer_jax.models import BertForPreTraining
    config, _, _, _ = load_run(pre)
    save_pretrained(tmp_path / "hf", BertForPreTraining(config), pre_params, tokenizer=pre_tok)
    train(_run(tmp_path, "classify", train_path, dev_path, 2, init=str(tmp_path / "hf"), lr=1e-12,
               warmup=1, out_dir=str(tmp_path / "from_hf")), progress=True)
    assert "--init: the encoder of Hugging Face directory" in capsys.readouterr().out
    _, params, _, _ = load_run(tmp_path / "from_hf")
    for name in ("embeddings", "encoder"):
        chex.assert_trees_all_close(pre_params["bert"][name], params["bert"][name], atol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("missing_field", r"--data '.*train.jsonl':2: field 'label' is missing"),
    ("null_field", r"--data '.*train.jsonl':2: field 'label' is empty \(null\); give a str or int"),
    ("one_class", r"--data '.*train.jsonl': field 'label' has a single class"),
    ("unknown_eval_label", r"--eval-data '.*dev.jsonl':5: field 'label' has 'nope'"),
    ("empty", r"--data '.*train.jsonl': the file holds no examples"),
    ("no_eval_data", "task 'classify' needs --eval-data FILE"),
    ("no_such_file", r"--data '.*missing.jsonl': no such file"),
    ("not_utf8", r"--data '.*train.jsonl':3: not UTF-8 text \(invalid continuation byte at byte \d+\)"),
])
def test_bad_files_are_refused_before_anything_is_written(tmp_path, capsys, case, match):
    good = _classify_records(20, 6)
    records = {"missing_field": [good[0], {"text": "no label"}] + good,
               "null_field": [good[0], {"text": "null label", "label": None}] + good,
               "one_class": [{**r, "label": "math"} for r in good]}.get(case, good)
    train_path = _write(tmp_path / "train.jsonl", records)
    dev = good[:4] + ([{"text": "x", "label": "nope"}] if case == "unknown_eval_label" else [])
    dev_path = _write(tmp_path / "dev.jsonl", dev)
    if case == "empty":
        train_path.write_text("")
    if case == "no_such_file":
        train_path = tmp_path / "missing.jsonl"
    if case == "not_utf8":   # a Latin-1 "é" on line 3
        lines = train_path.read_bytes().splitlines(keepends=True)
        lines[2] = b'{"text": "caf\xe9 math", "label": "math"}\n'
        train_path.write_bytes(b"".join(lines))
    out = tmp_path / "out"
    argv = ["train", "--model", "bert-tiny", "--task", "classify", "--data", str(train_path),
            "--out", str(out), "--no-progress"] + ([] if case == "no_eval_data" else
                                                   ["--eval-data", str(dev_path)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert not out.exists()


def test_predict_names_its_input_file_before_reading_the_model(tmp_path, capsys):
    """--input-file is read (and refused) before the checkpoint, its errors naming the flag."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    for path, expect in ((tmp_path / "missing.jsonl", f"--input-file '{tmp_path / 'missing.jsonl'}': no such file"),
                         (bad, f"--input-file '{bad}':2: not UTF-8 text")):
        assert main(["predict", "--model", str(tmp_path / "no_run"), "--input-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, err
    # Texts given two ways: refused, not one of them dropped.
    good = tmp_path / "good.txt"
    good.write_text("one text\n")
    for extra, given in ((["--text", "other"], "--text"), (["--text-pair", "b"], "--text-pair")):
        assert main(["predict", "--model", str(tmp_path / "no_run"), "--input-file", str(good),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert f"{given} and --input-file" in err and err.count("\n") == 1, err
