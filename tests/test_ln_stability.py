"""The LN-stability benchmark (experiments/ln_stability.py) on its micro preset.

One micro run of the command line (module fixture: every task of the sweep,
translation included, and the gradient study on the encoder-decoder) writes a
results directory; the tests read it and re-run it (resumption). A second process
with two (fake CPU) devices trains a few runs of the micro grid vmapped over two
devices, on one, and one by one. References are written here: the schedule by its
closed form, divergence on hand-made curves, the averaged gradient by an unscanned
model batch by batch, verdicts on hand-made records.

Both processes are compile-bound (about twenty small XLA programs, the scanned
encoder-decoder gradient programs the largest), so they run with lower XLA:CPU
code-generation effort: compiles about 2.5x faster, the same programs.
"""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ln_stability
from experiments.ln import analysis, bench, records, verdicts
from experiments.ln.data import load_task_data
from experiments.ln.presets import PRESETS, get_preset, model_config
from experiments.ln.sweep import RunSpec, group_specs, learning_rate, run_group
from xla_flags import child_xla_flags

pytestmark = pytest.mark.slow   # runs the LN experiment's micro preset end to end: deselect with -m 'not slow'

PRESET = get_preset("micro")
ROOT = Path(__file__).resolve().parents[1]


def _python(args: list[str], xla_flags: str = "") -> subprocess.CompletedProcess:
    """`python args` on the CPU with FAST_COMPILE (+ `xla_flags`), the repository first
    on the path; fails the test with the process's stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": child_xla_flags(xla_flags)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("ln-micro")
    result = _python(["-m", "experiments.ln_stability", "--preset", "micro", "--out", str(out),
                      "--quiet"])
    assert "estimate: ~" in result.stdout and "XLA compilations" in result.stdout
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
        # Translation: the final parameters' greedy translations scored (bleu_batches=1).
        assert (0 <= float(r["bleu"]) <= 100) if r["task"] == "seq2seq" else r["bleu"] == ""
    gn = list(csv.DictReader((micro / "gradnorm.csv").open()))
    g = PRESET.gradnorm
    assert len(gn) == len(g.placements) * len(g.seeds) * 2 * sum(g.depths)  # encoder + decoder
    assert {r["stack"] for r in gn} == {"encoder", "decoder"}
    assert all(float(r["w2"]) > 0 for r in gn)
    for name in ("gradnorm_layers", "gradnorm_depth", "loss_lm", "heatmap_lm", "loss_mlm",
                 "loss_seq2seq"):
        assert (micro / f"{name}.png").stat().st_size > 10_000
        assert f"({name}.png)" in report
    assert "BLEU: corpus BLEU-4" in report and "| BLEU |" in report
    for line in _lines(micro / "runs.jsonl"):
        run = json.loads(line)
        sweep = next(s for s in PRESET.sweeps if s.task == run["task"])
        assert len(run["val_loss"]) == len(run["val_accuracy"]) == sweep.steps // 4 + 1


def test_rerun_skips_recorded_work(micro):
    """Nothing is redone, and the timing of the run that did the work is kept: a rerun
    over a finished directory (the committed reference's) replaced it by ~1 s."""
    before = {n: _lines(micro / n) for n in (records.RUNS, records.GRADNORM, records.CHECKS)}
    timing = (micro / "timing.json").read_text()
    ln_stability.main(["--preset", "micro", "--out", str(micro), "--quiet"])
    assert {n: _lines(micro / n) for n in before} == before
    assert (micro / "timing.json").read_text() == timing
    wall = json.loads(timing)["wall_s"]
    assert f"This invocation: {wall:.0f} s wall" in (micro / "report.md").read_text()


# Three runs of the micro lm grid (lr 1e-3 without warm-up, seeds 0 and 1; lr 1e-2
# with warm-up 4), trained vmapped over 2 devices (padded to 4 runs) with runs 2 and 0
# shadowed (re-synchronised one by one), vmapped on one device, and runs 0 and 2 one
# by one; their loss curves as JSON.
DEVICE_RUNS = r"""
import json, sys, jax
from experiments.ln.data import load_task_data
from experiments.ln.presets import get_preset, model_config
from experiments.ln.sweep import group_specs, run_group

preset = get_preset("micro"); sweep = preset.sweeps[0]
data = load_task_data(preset, sweep.task, sys.argv[1])
train = data.train_batches(sweep.seeds, sweep.steps, sweep.batch_size)
valid = data.valid_batches(sweep.eval_batches, sweep.batch_size)
config = model_config(preset, sweep.task, "post", sweep.num_layers, sweep.width)
grid = group_specs(sweep, "post")
specs = [grid[0], grid[1], grid[-1]]
assert len(jax.local_devices()) == 2
curves = lambda r: {"train": r.metrics["loss"].tolist(), "valid": r.val_loss.tolist()}
spread = run_group(config, specs, sweep, train, valid, shadow=[2, 0])
alone = run_group(config, specs, sweep, train, valid, devices=jax.local_devices()[:1])
single = [run_group(config, [specs[i]], sweep, train, valid, batched=False) for i in (0, 2)]
print(json.dumps({"runs": [s.run_id for s in specs], "spread": curves(spread),
                  "alone": curves(alone), "single": [curves(r) for r in single],
                  "shadows": [{"index": h.index, "train": h.train_loss.tolist(),
                               "valid": h.val_loss.tolist()} for h in spread.shadows]}))
"""


@pytest.fixture(scope="module")
def device_runs(micro):
    result = _python(["-c", DEVICE_RUNS, str(micro / ".cache")],
                     "--xla_force_host_platform_device_count=2")
    return json.loads(result.stdout.splitlines()[-1])


def test_vmapped_runs_equal_one_by_one(micro, device_runs):
    """The check the benchmark records, and an independent one: runs 0 (lr 1e-3, no
    warm-up) and 2 (lr 1e-2, warm-up 4) of a vmapped group redone one by one."""
    checks = [json.loads(line) for line in _lines(micro / records.CHECKS)]
    assert checks and all(c["passed"] and c["max_abs_diff_train_loss"] <= 1e-4 for c in checks)
    assert device_runs["runs"] == ["lm/post/lr0.001/wu0-linear/s0", "lm/post/lr0.001/wu0-linear/s1",
                                   "lm/post/lr0.01/wu4-linear/s1"]
    batched = {k: np.asarray(v) for k, v in device_runs["alone"].items()}
    for single, i in zip(device_runs["single"], (0, 2)):
        np.testing.assert_allclose(single["train"][0], batched["train"][i], atol=1e-4)
        np.testing.assert_allclose(single["valid"][0], batched["valid"][i], atol=1e-4)
    assert len(batched["train"][0]) == PRESET.sweeps[0].steps
    # The comparison can fail: another seed's run is not within the tolerance.
    assert np.abs(batched["train"][0] - batched["train"][1]).max() > 1e-4


def test_shadowed_runs_follow_their_own_vmapped_run(device_runs):
    """`run_group(shadow=...)`, what the benchmark's check uses: each shadow is the
    unbatched program re-synchronised at every chunk to its own run of the group
    spread over 2 devices, in the order asked for; another run's curve is far off."""
    spread = {k: np.asarray(v) for k, v in device_runs["spread"].items()}
    shadows = device_runs["shadows"]
    assert [h["index"] for h in shadows] == [2, 0]
    for h in shadows:
        train, valid, i = np.asarray(h["train"]), np.asarray(h["valid"]), h["index"]
        assert train.shape == spread["train"][i].shape and valid.shape == spread["valid"][i].shape
        np.testing.assert_allclose(train, spread["train"][i], atol=1e-4)
        np.testing.assert_allclose(valid, spread["valid"][i], atol=1e-4)
        assert np.abs(train - spread["train"][2 - i]).max() > 1e-2


def test_learning_rate_is_the_library_schedule_in_closed_form():
    """Per-run (traced) peak, warm-up and decay: linear warm-up step / warmup, then
    linear decay to 0 at `steps`, the inverse square root sqrt(warmup / step), or
    Xiong et al.'s pre-LN schedule: constant, x0.1 from drop_step."""
    from experiments.ln.presets import Sweep
    steps = np.arange(12)
    linear = Sweep("lm", warmups=(4,), steps=12, eval_every=4)
    got = np.asarray(learning_rate(steps, {"peak_lr": 1e-2, "warmup": 4.0}, linear))
    want = [1e-2 * min(1, s / 4) * min(1, (12 - s) / 8) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    arms = Sweep("seq2seq", warmups=(0, 5), steps=12, eval_every=4, decay="rsqrt",
                 extra_arms=((0, "drop"), (2, "drop")), drop_step=7)
    assert arms.arms == ((0, "rsqrt"), (5, "rsqrt"), (0, "drop"), (2, "drop"))
    runs = [(1e-3, 0, "rsqrt"), (1e-2, 5, "rsqrt"), (2e-3, 0, "drop"), (1e-3, 2, "drop")]
    hp = {"peak_lr": jnp.array([p for p, _, _ in runs]), "warmup": jnp.array(
        [float(w) for _, w, _ in runs]), "decay": jnp.array([arms.decays.index(d)
                                                              for _, _, d in runs])}
    got = np.asarray(jax.vmap(lambda h: learning_rate(jnp.asarray(steps), h, arms))(hp))

    def closed(peak, w, decay, s):
        if s < w:
            return peak * s / w
        if decay == "rsqrt":
            return peak * math.sqrt(max(w, 1) / max(s, w, 1))
        return peak * (0.1 if s >= 7 else 1.0)
    want = [[closed(*run, s) for s in steps] for run in runs]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert [s.run_id for s in group_specs(arms, "pre")][:2] == [
        "seq2seq/pre/lr0.001/wu0-rsqrt/s0", "seq2seq/pre/lr0.001/wu0-rsqrt/s1"]


def test_divergence_and_spikes_on_handmade_curves():
    steps = [0, 10, 20, 30]
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], [1] * 30) == (None, "")
    assert analysis.divergence(steps, [6.0, 5.0, 6.5, 7.0], [1] * 30)[0] == 20
    finite = [1] * 30
    finite[13] = 0
    assert analysis.divergence(steps, [6.0, 5.0, 4.0, 3.9], finite)[0] == 13
    # The library's spike rule (`training.divergence`): > 1 nat above the running median.
    loss = [5.0] * 15 + [6.2] + [5.0] * 5 + [5.9] + [5.0] * 3
    grad_norm, finite = [1.0] * 25, [1] * 25
    assert analysis.count_spikes(loss, grad_norm, finite) == 1    # 1.2 nats yes, 0.9 no
    finite[15] = 0                      # a step that diverged is no spike
    assert analysis.count_spikes(loss, grad_norm, finite) == 0
    grad_norm[15], finite[15] = math.inf, 1
    assert analysis.count_spikes(loss, grad_norm, finite) == 0


def test_mean_gradient_norms_match_an_unscanned_model_batch_by_batch(micro):
    """The micro run's records of gradnorm.measure (scanned layers, vmapped seeds,
    scanned batches) against the unscanned encoder-decoder, one batch at a time, the
    mean taken here, for the 2-2 post-LN model's every seed (a mixed-up seed axis
    fails). The reference gradient is one jitted program of the unscanned model, run
    batch by batch; dispatched eagerly op by op it cost ~15 s a seed."""
    from transformer_jax.models import build
    from transformer_jax.stacks import unstack_layers
    from transformer_jax.training import compute_grads, get_task
    study = PRESET.gradnorm
    rows = [r for r in records.read(micro, records.GRADNORM, [PRESET.fingerprint(study)])
            if (r["placement"], r["depth"]) == ("post", 2)]
    assert [r["seed"] for r in rows] == list(study.seeds) and study.batches >= 2
    assert all(r["batches"] == study.batches for r in rows)
    data = load_task_data(PRESET, "seq2seq", micro / ".cache")
    batches = data.train_batches(study.seeds, study.batches, study.batch_size)
    scanned = model_config(PRESET, "seq2seq", "post", 2, study.width).replace(scan_layers=True)
    task = get_task("seq2seq")
    example = task.example_batch(scanned, 1, scanned.max_len)
    apply = build(scanned.replace(scan_layers=False)).apply
    init = jax.jit(lambda key: task.apply(build(scanned).init, key, example,
                                          deterministic=True)["params"])
    grad_of = jax.jit(lambda params, batch: compute_grads(apply, params, batch, None, task)[2])
    for j, row in enumerate(rows):
        params = unstack_layers(init(jax.random.PRNGKey(row["seed"])))
        grads = [grad_of(params, {k: v[j, i] for k, v in batches.items()})
                 for i in range(study.batches)]
        want = [float(np.linalg.norm(np.mean([g[stack][f"layer_{i}"]["mlp"]["down"]["kernel"]
                                              for g in grads], 0)))
                for stack in ("encoder", "decoder") for i in range(2)]
        np.testing.assert_allclose(row["w2"], want, rtol=1e-4)
        # The mean gradient's norm, not the mean of the norms (which is larger).
        norm_mean = np.mean([np.linalg.norm(g["decoder"]["layer_1"]["mlp"]["down"]["kernel"])
                             for g in grads])
        assert row["w2"][-1] < norm_mean * (1 - 1e-3)


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
        run_group(None, [RunSpec("lm", "pre", 1e-3, 0, 0, "linear")] * 2, PRESET.sweeps[0], {}, {},
                  batched=False)
    with pytest.raises(ValueError, match=r"shadow=\[1\] needs batched=True and indices in "
                                          r"\[0, 1\)"):
        run_group(None, [RunSpec("lm", "pre", 1e-3, 0, 0, "linear")], PRESET.sweeps[0], {}, {},
                  shadow=[1])
    from experiments.ln.presets import Sweep
    with pytest.raises(ValueError, match=r"bleu_batches=1 .*task='mlm'"):
        Sweep("mlm", bleu_batches=1)
    with pytest.raises(ValueError, match=r"bleu_batches=5 must be in \[0, eval_batches=4\]"):
        Sweep("seq2seq", eval_batches=4, bleu_batches=5)


def _run(placement, lr, warmup, seed, curve, escaped=True, diverged_at=None, task="lm",
         decay="rsqrt"):
    return {"task": task, "placement": placement, "peak_lr": lr, "warmup": warmup, "seed": seed,
            "decay": decay, "run_id": f"{task}/{placement}/lr{lr:g}/wu{warmup}-{decay}/s{seed}",
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
    assert "mlm/pre/lr0.001/wu0-rsqrt/s0" in claim.evidence[0]
    # Translation decides claim 2 when present; LM is reported beside it.
    both = _grid(stuck, fast, task="seq2seq") + _grid(([6.0, 5.5, 5.0, 4.5],), slow)
    claim_a, _ = verdicts.claim2(both)
    assert claim_a.status == verdicts.SUPPORTED and "GPT (LM): refuted" in claim_a.evidence[0]


def test_paper_schedule_arm_and_its_same_schedule_control():
    """Pre-LN on the paper's own schedule ("drop": no warm-up, constant, x0.1 later)
    decides 2b as the paper frames it, and post-LN on that same setting is the control:
    2a holds only if pre-LN beats post-LN there (or under rsqrt) without warm-up."""
    stuck = [6.0, 5.4, 5.3, 5.3]
    fast = [6.0, 4.9, 4.4, 4.3]                            # reaches 4.5 at step 20

    def grid(post_on_drop, diverged_at=None):
        # rsqrt from the first update: both placements stay on the plateau without warm-up
        runs = [{**r, "escaped_plateau": False} if r["warmup"] == 0 else r
                for r in _grid((stuck, False), stuck, task="seq2seq")]
        for lr in (1e-3, 3e-3):
            for s in (0, 1):
                runs.append(_run("pre", lr, 0, s, fast, task="seq2seq", decay="drop"))
                runs.append(_run("post", lr, 0, s, post_on_drop, task="seq2seq", decay="drop",
                                 escaped=post_on_drop[-1] < 5.2, diverged_at=diverged_at))
        return runs
    # Post-LN fails on the constant schedule without warm-up: both claims hold.
    claim_a, claim_b = verdicts.claim2(grid([6.0, 7.5, 8.0, 9.0], diverged_at=10))
    text_a, text_b = " ".join(claim_a.evidence), " ".join(claim_b.evidence)
    assert claim_a.status == verdicts.SUPPORTED, text_a
    assert "no warm-up, drop: post-LN diverged 2/2" in text_a and "-> pre-LN better" in text_a
    assert "lr 0.001, no warm-up, rsqrt: post-LN diverged 0/2, stayed on the unigram" in text_a
    assert "-> pre-LN fails too" in text_a
    assert claim_b.status == verdicts.SUPPORTED and "seq2seq/pre/lr0.001/wu0-drop" in text_b
    assert "control: post-LN on that setting (seq2seq/post/lr0.001/wu0-drop)" in text_b
    # Post-LN trains as well on that schedule: not the placement, so 2a is refuted,
    # while 2b (the paper's framing) holds and its control says post-LN is as fast.
    claim_a, claim_b = verdicts.claim2(grid(fast))
    text_b = " ".join(claim_b.evidence)
    assert claim_a.status == verdicts.REFUTED and "pre-LN not better" in " ".join(claim_a.evidence)
    assert claim_b.status == verdicts.SUPPORTED and "reaches the target at step 20" in text_b


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
    # One depth says nothing of growth with depth; a 1-layer stack's top and bottom are
    # one layer (both ratios exactly 1 read as "refuted"); a 2-layer one is used instead.
    claim_a, claim_b = verdicts.claim1([r for r in gn if r["depth"] == 4])
    assert claim_a.status == verdicts.INCONCLUSIVE and "one depth only" in claim_a.evidence[-1]
    assert claim_b.status == verdicts.SUPPORTED
    shallow = [rows("post", 1, growing, 1.0), rows("pre", 1, flat, 0.5)]
    assert [v.status for v in verdicts.claim1(shallow)] == [verdicts.INCONCLUSIVE] * 2
    two = shallow + [rows("post", 2, growing, 1.0), rows("pre", 2, flat, 0.4)]
    claim_b = verdicts.claim1(two)[1]
    assert claim_b.status == verdicts.SUPPORTED and "2-layer decoder" in claim_b.evidence[1]


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
    with pytest.raises(SystemExit) as exit_info:   # fewer seeds than a part has: a traceback
        ln_stability.main(["--preset", "micro", "--seeds", "5", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--seeds 5: seeds=(5,) must be at least 2" in err
    assert not (tmp_path / "s").exists()
    for preset in PRESETS.values():          # every preset's time estimate is computable
        assert bench.estimate(preset)["flops"] > 0
        assert bench.estimate_line(preset).startswith("estimate: ~")


def test_bad_directories_and_an_empty_report_only_are_usage_errors(micro, tmp_path, capsys):
    """--out / --cache-dir naming a file, and --report-only where this preset has no
    records, stop with a usage error naming the flag and the path; nothing is written
    and the records already there are kept."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [(["--out", str(a_file)], "--out"),
             (["--out", str(a_file / "sub")], "--out"),
             (["--out", str(micro), "--cache-dir", str(a_file), "--report-only"], "--cache-dir"),
             (["--out", str(tmp_path / "new"), "--cache-dir", str(a_file)], "--cache-dir"),
             (["--out", str(tmp_path / "empty"), "--report-only"], "--report-only: no records"),
             # records of another preset are not this one's
             (["--out", str(micro), "--report-only", "--preset", "quick"],
              "--report-only: no records of preset 'quick' (its current settings) in "
              f"'{micro}' (those there are of other settings")]
    before = {p.name: p.read_bytes() for p in micro.iterdir() if p.is_file()}
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            ln_stability.main(["--preset", "micro", "--quiet", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert a_file.read_text() == "keep me" and not (tmp_path / "empty").exists()
    assert not (tmp_path / "new").exists()   # made only once every directory is usable
    assert {p.name: p.read_bytes() for p in micro.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("task", ["seq2seq", "mlm"])
def test_parameter_count_of_the_estimate_is_the_models(task):
    """bench extrapolates counts in depth from 1- and 2-layer models: against the
    parameters of the (unscanned) 3-layer model itself."""
    from transformer_jax.training.metrics import count_params
    from transformer_jax.training.state import init_params
    config = model_config(PRESET, task, "sandwich", 3, PRESET.sweeps[0].width)
    params = jax.eval_shape(lambda k: init_params(config, k)[0], jax.random.key(0))
    assert bench._num_params(config) == count_params(params, exclude_position=True)


def test_sweep_spreads_runs_over_devices_like_one_device(device_runs):
    """The vmapped group sharded over 2 (fake CPU) devices, padded to an even count,
    gives the one-device group's losses; runs differ from each other (so it can fail)."""
    spread, alone = device_runs["spread"], device_runs["alone"]
    assert np.shape(spread["train"]) == np.shape(alone["train"]) == (3, PRESET.sweeps[0].steps)
    for key in ("train", "valid"):
        np.testing.assert_allclose(spread[key], alone[key], atol=1e-5)
    assert np.abs(np.subtract(spread["train"][0], spread["train"][1])).max() > 1e-4


def test_measurable_difference_uses_the_unbiased_variance_of_few_seeds():
    """Two seeds 4.80 / 4.84 against 4.79 / 4.79: 0.03 apart. The difference's standard
    error from the ddof=1 variances is 0.02 (0.03 < 2 se: not measurable); the ddof=0
    one would be 0.014 and call it measurable. With one seed per cell only MIN_GAP decides."""
    cell_of = lambda *losses: [{"final_val_loss": v} for v in losses]
    assert not verdicts._worse(cell_of(4.80, 4.84), cell_of(4.79, 4.79))
    assert verdicts._worse(cell_of(4.80, 4.84), cell_of(4.70, 4.70))
    assert verdicts._worse(cell_of(4.85), cell_of(4.82)) and not verdicts._worse(
        cell_of(4.83), cell_of(4.82))
    assert verdicts._worse(cell_of(None), cell_of(4.82))   # a non-finite final loss is worse


def test_the_reported_spread_is_the_sample_std_of_the_seeds():
    """fmt's 'm ± s' uses the same ddof=1 estimate as the measurability test: for
    4.80 / 4.84 the sample std is 0.04 / sqrt(2) = 0.028 (ddof=0 would print 0.02);
    non-finite values are left out, and one value prints alone."""
    assert verdicts.fmt([4.80, 4.84]) == "4.82 ± 0.03"
    assert verdicts.fmt([1.0, 2.0, 3.0, float("nan"), None]) == "2.0 ± 1"
    assert verdicts.fmt([5.25]) == "5.25" and verdicts.fmt([None]) == "n/a"
    assert verdicts.spread([2.0]) == 0.0
    # The mean to the decimal place of the spread at least: "4.8 ± 0.006" hid whether
    # it was 4.75 or 4.84, and "5 ± 0.01" read as an integer; one guard digit at most.
    assert verdicts.fmt([4.796, 4.804]) == "4.800 ± 0.006"
    assert verdicts.fmt([4.99, 5.01]) == "5.00 ± 0.01"
    assert verdicts.fmt([0.45, 0.58]) == "0.515 ± 0.09" and verdicts.fmt([0.3, 0.7]) == "0.50 ± 0.3"
    assert verdicts.fmt([5.0, 5.0]) == "5 ± 0"


def test_an_interrupted_benchmark_says_what_is_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a notebook's stop button) mid-sweep: one line saying the records are
    kept and a rerun continues, then the KeyboardInterrupt itself (the command line
    turns it into exit status 130 without a traceback)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "run_gradnorm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ln_stability.main(["--preset", "micro", "--out", str(tmp_path / "ln"), "--quiet"])
    err = capsys.readouterr().err
    assert f"interrupted; the records written so far are kept in '{tmp_path / 'ln'}'" in err
    assert "rerun the same command to continue" in err
