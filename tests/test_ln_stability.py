"""The LN-stability benchmark (experiments/ln_stability.py) on its micro preset.

One micro run (module fixture: every task of the sweep, translation included, and
the gradient study on the encoder-decoder) writes a results directory; the tests
read it, re-run it (resumption), and compare vmapped runs with the same runs done
one by one, reusing the programs the micro run compiled. References are written
here: the schedule by its closed form, divergence on hand-made curves, the
averaged gradient by an unscanned model batch by batch, verdicts on hand-made
records.
"""
import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ln_stability
from experiments.ln import analysis, bench, records, verdicts
from experiments.ln.data import load_task_data
from experiments.ln.presets import PRESETS, get_preset, model_config
from experiments.ln.sweep import RunSpec, group_specs, learning_rate, run_group

PRESET = get_preset("micro")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("ln-micro")
    ln_stability.main(["--preset", "micro", "--out", str(out), "--quiet"])
    return out


def _lines(path):
    return path.read_text().splitlines()


def test_micro_writes_report_csv_and_plots(micro):
    report = (micro / "report.md").read_text()
    assert "## Verdicts" in report
    for claim in ("**1a.", "**1b.", "**2a.", "**2b.", "**3."):
        assert claim in report
    rows = list(csv.DictReader((micro / "summary.csv").open()))
    expected = {s.run_id for sweep in PRESET.sweeps for p in sweep.placements
                for s in group_specs(sweep, p)}
    assert {r["run_id"] for r in rows} == expected
    assert {r["task"] for r in rows} == {"lm", "mlm", "seq2seq"}
    for r in rows:
        assert math.isfinite(float(r["initial_val_loss"])) and float(r["peak_lr"]) > 0
        assert r["diverged"] in ("True", "False")
        assert 0 <= float(r["final_val_accuracy"]) <= 1
        if r["task"] == "mlm":   # NSP apart from the MLM loss
            assert 0 < float(r["final_val_nsp_loss"]) < 2
    gn = list(csv.DictReader((micro / "gradnorm.csv").open()))
    g = PRESET.gradnorm
    assert len(gn) == len(g.placements) * len(g.seeds) * 2 * sum(g.depths)  # encoder + decoder
    assert {r["stack"] for r in gn} == {"encoder", "decoder"}
    assert all(float(r["w2"]) > 0 for r in gn)
    for name in ("gradnorm_layers", "gradnorm_depth", "loss_lm", "heatmap_lm", "loss_mlm",
                 "loss_seq2seq"):
        assert (micro / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in report
    for line in _lines(micro / "runs.jsonl"):
        run = json.loads(line)
        sweep = next(s for s in PRESET.sweeps if s.task == run["task"])
        assert len(run["val_loss"]) == len(run["val_accuracy"]) == sweep.steps // 4 + 1


def test_rerun_skips_recorded_work(micro):
    before = {n: _lines(micro / n) for n in (records.RUNS, records.GRADNORM, records.CHECKS)}
    ln_stability.main(["--preset", "micro", "--out", str(micro), "--quiet"])
    assert {n: _lines(micro / n) for n in before} == before


def test_vmapped_runs_equal_one_by_one(micro):
    """The check the benchmark records, and an independent one on a tiny case
    (the programs are those the micro run compiled, so nothing new is compiled)."""
    checks = [json.loads(line) for line in _lines(micro / records.CHECKS)]
    assert checks and all(c["passed"] and c["max_abs_diff_train_loss"] <= 1e-4 for c in checks)
    sweep = PRESET.sweeps[0]
    data = load_task_data(PRESET, sweep.task, micro / ".cache")
    train = data.train_batches(sweep.seeds, sweep.steps, sweep.batch_size)
    valid = data.valid_batches(sweep.eval_batches, sweep.batch_size)
    config = model_config(PRESET, sweep.task, "post", sweep.num_layers, sweep.width)
    specs = group_specs(sweep, "post")
    batched = run_group(config, specs, sweep, train, valid)
    for i in (0, len(specs) - 1):   # lr 1e-3 without warm-up, lr 1e-2 with warm-up
        single = run_group(config, [specs[i]], sweep, train, valid, batched=False)
        np.testing.assert_allclose(single.metrics["loss"][0], batched.metrics["loss"][i], atol=1e-4)
        np.testing.assert_allclose(single.val_loss[0], batched.val_loss[i], atol=1e-4)
    # The comparison can fail: another seed's run is not within the tolerance.
    other = [j for j, s in enumerate(specs) if s.seed != specs[0].seed and s.warmup == 0
             and s.peak_lr == specs[0].peak_lr][0]
    assert np.abs(batched.metrics["loss"][0] - batched.metrics["loss"][other]).max() > 1e-4


def test_learning_rate_is_the_library_schedule_in_closed_form():
    """Per-run (traced) peak and warm-up: linear warm-up step / warmup, then linear
    decay to 0 at `total` or the inverse square root sqrt(warmup / step)."""
    steps = np.arange(12)
    got = np.asarray(learning_rate(steps, 1e-2, 4.0, 12, "linear"))
    want = [1e-2 * min(1, s / 4) * min(1, (12 - s) / 8) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = np.asarray(learning_rate(steps, 2e-3, 4.0, 12, "rsqrt"))
    want = [2e-3 * (s / 4 if s < 4 else math.sqrt(4 / s)) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(learning_rate(steps, 1e-2, 0.0, 12, "constant"), 1e-2)
    peaks, warmups = np.array([1e-3, 1e-2]), np.array([0.0, 5.0])   # two runs at once
    got = np.asarray(jax.vmap(lambda p, w: learning_rate(jnp.asarray(3), p, w, 12, "rsqrt"))(
        peaks, warmups))
    np.testing.assert_allclose(got, [1e-3 / math.sqrt(3), 1e-2 * 3 / 5], rtol=1e-6)


def test_divergence_and_spikes_on_handmade_curves():
    steps = [0, 10, 20, 30]
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], [1] * 30) == (None, "")
    assert analysis.divergence(steps, [6.0, 5.0, 6.5, 7.0], [1] * 30)[0] == 20
    finite = [1] * 30
    finite[13] = 0
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], finite)[0] == 13
    loss = [5.0] * 15 + [9.0] + [5.0] * 5
    assert analysis.count_spikes(loss, [1.0] * 21, [1] * 21) == 1


def test_mean_gradient_norms_match_an_unscanned_model_batch_by_batch(micro):
    """gradnorm.measure (scanned layers, vmapped seeds, scanned batches) against the
    unscanned encoder-decoder, one batch at a time, the mean taken here."""
    import dataclasses

    from experiments.ln import gradnorm
    from transformer_jax.models import build
    from transformer_jax.stacks import unstack_layers
    from transformer_jax.training import compute_grads, get_task
    study = dataclasses.replace(PRESET.gradnorm, seeds=(3,), batches=3)
    data = load_task_data(PRESET, "seq2seq", micro / ".cache")
    batches = data.train_batches(study.seeds, study.batches, study.batch_size)
    rows = gradnorm.measure(PRESET, study, "post", 2, batches)
    scanned = model_config(PRESET, "seq2seq", "post", 2, study.width).replace(scan_layers=True)
    task = get_task("seq2seq")
    args, kwargs = task.inputs(task.example_batch(scanned, 1, scanned.max_len))
    params = unstack_layers(jax.jit(lambda k: build(scanned).init(
        k, *args, **kwargs, deterministic=True))(jax.random.PRNGKey(3))["params"])
    apply = build(scanned.replace(scan_layers=False)).apply
    grads = [compute_grads(apply, params, {k: v[0, i] for k, v in batches.items()}, None,
                           task)[2] for i in range(study.batches)]
    want = [float(np.linalg.norm(np.mean([g[stack][f"layer_{i}"]["mlp"]["down"]["kernel"]
                                          for g in grads], 0)))
            for stack in ("encoder", "decoder") for i in range(2)]
    np.testing.assert_allclose(rows[0]["w2"], want, rtol=1e-4)
    # The mean gradient's norm, not the mean of the norms (which is larger).
    norm_mean = np.mean([np.linalg.norm(g["decoder"]["layer_1"]["mlp"]["down"]["kernel"])
                         for g in grads])
    assert rows[0]["w2"][-1] < norm_mean * (1 - 1e-3)


def test_mlm_data_and_baseline(micro):
    data = load_task_data(PRESET, "mlm", micro / ".cache")
    train = data.train_batches((0,), 2, 4)
    valid = data.valid_batches(1, 4)
    assert train["input_ids"].shape == (1, 2, 4, PRESET.seq_len)
    assert valid["mlm_ids"].shape[0] == 1
    baseline = analysis.unigram_loss("mlm", train, valid, data.vocab_size)
    assert 1 < baseline < math.log(data.vocab_size) + 1   # MLM alone, no NSP term


def test_unigram_baseline_matches_a_hand_computation():
    train = {"targets": np.array([[1, 1, 2, 0]]), "loss_mask": np.array([[1, 1, 1, 0]])}
    valid = {"targets": np.array([[1, 2]]), "loss_mask": np.array([[1, 1]])}
    # counts (+1): token0 1, token1 3, token2 2, token3 1 -> p = [1, 3, 2, 1] / 7
    want = -(math.log(3 / 7) + math.log(2 / 7)) / 2
    assert analysis.unigram_loss("lm", train, valid, 4) == pytest.approx(want)
    seq2seq = {"tgt_out": train["targets"], "tgt_mask": train["loss_mask"]}
    valid2 = {"tgt_out": valid["targets"], "tgt_mask": valid["loss_mask"]}
    assert analysis.unigram_loss("seq2seq", seq2seq, valid2, 4) == pytest.approx(want)


def test_records_skip_torn_lines_and_other_settings(tmp_path):
    records.append(tmp_path, "r.jsonl", [{"fingerprint": "a", "x": float("nan")}])
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"fingerprint": "a", "x": 1')          # interrupted write
    records.append(tmp_path, "r.jsonl",
                   [{"fingerprint": "b", "x": 2}, {"fingerprint": "a", "x": 3}])
    assert [r["x"] for r in records.read(tmp_path, "r.jsonl", ["a"])] == [None, 3]


def test_bad_names_raise_value_errors():
    with pytest.raises(ValueError, match="preset='huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="placement='mid'"):
        model_config(PRESET, "lm", "mid", 2, PRESET.sweeps[0].width)
    with pytest.raises(ValueError, match="batched=False"):
        run_group(None, [RunSpec("lm", "pre", 1e-3, 0, 0)] * 2, PRESET.sweeps[0], {}, {},
                  batched=False)


def _run(placement, lr, warmup, seed, curve, escaped=True, diverged_at=None, task="lm"):
    return {"task": task, "placement": placement, "peak_lr": lr, "warmup": warmup, "seed": seed,
            "run_id": f"{task}/{placement}/lr{lr:g}/wu{warmup}/s{seed}",
            "final_val_loss": curve[-1], "val_loss": list(curve),
            "val_steps": [10 * i for i in range(len(curve))], "escaped_plateau": escaped,
            "diverged": diverged_at is not None, "diverged_at": diverged_at,
            "unigram_loss": 5.3, "steps": 10 * (len(curve) - 1)}


def _grid(post_no_warmup, pre_curve, task="lm"):
    """post-LN with warm-up 10 learns to 4.5 at both lrs; post-LN without warm-up and
    pre-LN without warm-up follow the given curves; two seeds each."""
    runs = []
    for lr in (1e-3, 3e-3):
        for s in (0, 1):
            runs.append(_run("post", lr, 10, s, [6.0, 5.5, 5.0, 4.5], task=task))
            runs.append(_run("post", lr, 0, s, post_no_warmup[0], *post_no_warmup[1:],
                             task=task))
            runs.append(_run("pre", lr, 0, s, pre_curve, task=task))
            runs.append(_run("pre", lr, 10, s, [6.0, 5.5, 5.0, 4.6], task=task))
    return runs


def test_warmup_and_speed_verdicts_on_synthetic_records():
    stuck = ([6.0, 5.4, 5.3, 5.3], False)                  # post-LN on the plateau
    fast = [6.0, 4.9, 4.4, 4.3]                            # reaches 4.5 at step 20, not 30
    runs = _grid(stuck, fast, task="seq2seq")
    claim_a, claim_b = verdicts.claim2(runs)
    assert claim_a.status == verdicts.SUPPORTED
    assert "stayed on the unigram plateau 2/2" in " ".join(claim_a.evidence)
    assert claim_b.status == verdicts.SUPPORTED and "33% fewer updates" in claim_b.evidence[1]
    slow = [6.0, 5.6, 5.2, 4.8]                            # never reaches 4.5
    claim_a, claim_b = verdicts.claim2(_grid(([6.0, 5.5, 5.0, 4.5],), slow, task="seq2seq"))
    assert claim_a.status == verdicts.REFUTED and claim_b.status == verdicts.REFUTED
    # The runs deciding 2b did not learn: inconclusive, and they are named.
    runs = [r if r["placement"] != "pre" or r["warmup"] else {**r, "escaped_plateau": False}
            for r in _grid(stuck, fast, task="mlm")]
    claim = verdicts.claim3(runs)
    assert claim.status == verdicts.INCONCLUSIVE
    assert "mlm/pre/lr0.001/wu0/s0" in claim.evidence[0]
    # Translation decides claim 2 when present; LM is reported beside it.
    both = _grid(stuck, fast, task="seq2seq") + _grid(([6.0, 5.5, 5.0, 4.5],), slow)
    claim_a, _ = verdicts.claim2(both)
    assert claim_a.status == verdicts.SUPPORTED and "GPT (LM): refuted" in claim_a.evidence[0]


def test_gradient_verdicts_on_synthetic_records():
    def rows(placement, depth, profile, top):
        w2 = list(profile(depth)) + list(profile(depth)[:-1]) + [top]
        return {"placement": placement, "depth": depth, "seed": 0, "w2": w2,
                "stacks": ["encoder", "decoder"]}
    growing = lambda d: np.geomspace(0.1, 1.0, d)
    flat = lambda d: np.full(d, 0.5)
    gn = [rows("post", 4, growing, 1.0), rows("post", 16, growing, 1.0),
          rows("pre", 4, flat, 0.5), rows("pre", 16, flat, 0.25)]
    claim_a, claim_b = verdicts.claim1(gn)
    assert claim_a.status == verdicts.SUPPORTED and "-0.50" in claim_a.evidence[2]
    assert claim_b.status == verdicts.SUPPORTED
    swapped = [{**r, "placement": "pre" if r["placement"] == "post" else "post"} for r in gn]
    assert all(v.status == verdicts.REFUTED for v in verdicts.claim1(swapped))


def test_seeds_flag_and_preset_validation(tmp_path, capsys):
    other = PRESET.with_seeds((10, 11, 12))     # each part keeps its number of seeds
    assert other.gradnorm.seeds == (10, 11)
    assert [s.seeds for s in other.sweeps] == [(10, 11), (10,), (10,)]
    for bad in ((1, 1), (5,), (-1, 2)):
        with pytest.raises(ValueError, match="seeds"):
            PRESET.with_seeds(bad)
    with pytest.raises(SystemExit):
        ln_stability.main(["--preset", "micro", "--seeds", "1,x", "--out", str(tmp_path)])
    assert "--seeds='1,x'" in capsys.readouterr().err
    for preset in PRESETS.values():          # every preset's time estimate is computable
        assert bench.estimate(preset)["flops"] > 0


MULTI_DEVICE = r"""
import sys, numpy as np, jax
from experiments.ln.data import load_task_data
from experiments.ln.presets import get_preset, model_config
from experiments.ln.sweep import group_specs, run_group
preset = get_preset("micro"); sweep = preset.sweeps[0]
data = load_task_data(preset, sweep.task, sys.argv[1])
train = data.train_batches(sweep.seeds, sweep.steps, sweep.batch_size)
valid = data.valid_batches(sweep.eval_batches, sweep.batch_size)
config = model_config(preset, sweep.task, "pre", sweep.num_layers, sweep.width)
specs = group_specs(sweep, "pre")[:3]            # 3 runs on 2 devices: one padding run
assert len(jax.local_devices()) == 2
spread = run_group(config, specs, sweep, train, valid)
alone = run_group(config, specs, sweep, train, valid, devices=jax.local_devices()[:1])
assert spread.metrics["loss"].shape[0] == 3 and spread.val_loss.shape[0] == 3
print(float(np.abs(spread.metrics["loss"] - alone.metrics["loss"]).max()),
      float(np.abs(spread.val_loss - alone.val_loss).max()),
      float(np.abs(spread.metrics["loss"][0] - spread.metrics["loss"][1]).max()))
"""


def test_sweep_spreads_runs_over_devices_like_one_device(micro):
    """The vmapped group sharded over 2 (fake CPU) devices, padded to an even count,
    gives the one-device group's losses; runs differ from each other (so it can fail)."""
    import os
    import subprocess
    import sys
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2 "
        + fast_compile).strip()}
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE, str(micro / ".cache")], env=env,
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    train_diff, valid_diff, between_runs = map(float, result.stdout.split()[-3:])
    assert train_diff <= 1e-5 and valid_diff <= 1e-5
    assert between_runs > 1e-4
