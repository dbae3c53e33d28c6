"""The LN-stability benchmark (experiments/ln_stability.py) on its micro preset.

One micro run (module fixture) writes a results directory; the tests read it,
re-run it (resumption), and compare vmapped runs with the same runs done one by
one, reusing the programs the micro run compiled. References are written here:
the warm-up schedule by hand, divergence on hand-made curves.
"""
import csv
import json
import math

import numpy as np
import pytest

from experiments import ln_stability
from experiments.ln import analysis, records, verdicts
from experiments.ln.data import load_task_data
from experiments.ln.presets import get_preset, model_config
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
    for r in rows:
        assert math.isfinite(float(r["initial_val_loss"])) and float(r["peak_lr"]) > 0
        assert r["diverged"] in ("True", "False")
    gn = list(csv.DictReader((micro / "gradnorm.csv").open()))
    g = PRESET.gradnorm
    assert len(gn) == len(g.placements) * len(g.seeds) * sum(g.depths)
    assert all(float(r["w2"]) > 0 for r in gn)
    for name in ("gradnorm_layers", "gradnorm_depth", "loss_lm", "heatmap_lm"):
        assert (micro / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in report
    for line in _lines(micro / "runs.jsonl"):
        assert len(json.loads(line)["val_loss"]) == PRESET.sweeps[0].steps // 4 + 1


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


def test_learning_rate_warmup_then_linear_decay():
    steps = np.arange(10)
    got = np.asarray(learning_rate(steps, 1e-2, 4.0, 10, "linear"))
    want = [1e-2 * min(1, (s + 1) / 4) * min(1, (10 - s) / 6) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(learning_rate(steps, 1e-2, 0.0, 10, "constant"), 1e-2)


def test_divergence_and_spikes_on_handmade_curves():
    steps = [0, 10, 20, 30]
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], [1] * 30) == (None, "")
    assert analysis.divergence(steps, [6.0, 5.0, 6.5, 7.0], [1] * 30)[0] == 20
    finite = [1] * 30
    finite[13] = 0
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], finite)[0] == 13
    loss = [5.0] * 15 + [9.0] + [5.0] * 5
    assert analysis.count_spikes(loss, [1.0] * 21, [1] * 21) == 1


def test_mlm_data_and_baseline(micro):
    """The BERT side, which the micro preset leaves out of its (compile-bound) sweep."""
    data = load_task_data(PRESET, "mlm", micro / ".cache")
    train = data.train_batches((0,), 2, 4)
    valid = data.valid_batches(1, 4)
    assert train["input_ids"].shape == (1, 2, 4, PRESET.seq_len)
    assert valid["mlm_ids"].shape[0] == 1
    baseline = analysis.unigram_loss("mlm", train, valid, data.vocab_size)
    assert math.log(2) < baseline < math.log(2) + math.log(data.vocab_size) + 1


def test_unigram_baseline_matches_a_hand_computation():
    train = {"targets": np.array([[1, 1, 2, 0]]), "loss_mask": np.array([[1, 1, 1, 0]])}
    valid = {"targets": np.array([[1, 2]]), "loss_mask": np.array([[1, 1]])}
    # counts (+1): token0 1, token1 3, token2 2, token3 1 -> p = [1, 3, 2, 1] / 7
    want = -(math.log(3 / 7) + math.log(2 / 7)) / 2
    assert analysis.unigram_loss("lm", train, valid, 4) == pytest.approx(want)


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


def _run(placement, lr, warmup, seed, final, escaped=True, diverged_at=None):
    curve = [6.0, 5.5, final]
    return {"task": "lm", "placement": placement, "peak_lr": lr, "warmup": warmup, "seed": seed,
            "final_val_loss": final, "val_loss": curve, "val_steps": [0, 10, 20],
            "escaped_plateau": escaped, "diverged": diverged_at is not None,
            "diverged_at": diverged_at, "unigram_loss": 5.3, "steps": 20}


def test_verdicts_on_synthetic_records():
    """Claim 2 holds when post-LN fails only without warm-up and pre-LN trains; it is
    not called supported when post-LN trains either way."""
    good = [_run(p, 1e-3, w, s, 4.5) for p in ("post", "pre") for w in (0, 10) for s in (0, 1)]
    bad = [_run("post", 1e-3, 0, s, 5.3, escaped=False, diverged_at=None if s else 10)
           if r["placement"] == "post" and r["warmup"] == 0 else r for s, r in
           zip([0, 1] * 4, good)]
    claim_a = verdicts.claim2(bad, ["lm"])[0]
    assert claim_a.status == verdicts.SUPPORTED
    assert "diverged 1/2 (steps 10)" in " ".join(claim_a.evidence)
    assert verdicts.claim2(good, ["lm"])[0].status == verdicts.NOT_REPRODUCED
    gn = [{"placement": p, "depth": d, "seed": 0, "w2": [1.0] * (d - 1) + [top],
           "w1": [1.0] * d, "attention": [1.0] * d}
          for p, d, top in (("post", 4, 2.0), ("post", 16, 2.0), ("pre", 4, 1.0), ("pre", 16, 0.5))]
    claim_a, claim_b = verdicts.claim1(gn)
    assert claim_a.status == verdicts.SUPPORTED and "-0.50" in claim_a.evidence[2]
    assert claim_b.status in (verdicts.SUPPORTED, verdicts.PARTLY)


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
