"""The throughput benchmark and its profiler summary, on CPU at tiny size."""
from __future__ import annotations

import re

import chex
import numpy as np
import pytest

from experiments import bench_throughput, trace_summary
from transformer_jax.models import get_config
from transformer_jax.training import task_for_config
from transformer_jax.training.tasks import TASKS

HLO = """\
HloModule jit_train_step

%fused_computation.7 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %tanh.1 = f32[4]{0} tanh(%param_0), metadata={op_name="jit(train_step)/transpose(jvp(GPT))/decoder/layer_3/layer_3.residual/mlp/tanh"}
}

ENTRY %main.9 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %copy.2 = f32[4]{0} copy(%state_opt_state_1__0__mu__decoder____layer_0____kernel__.1)
  %dot.3 = f32[4]{0} dot(%p, %p), metadata={op_name="jit(train_step)/jvp(GPT)/decoder/layer_11/layer_11.residual/mlp/up/dot_general"}
  ROOT %loop_tanh_fusion = f32[4]{0} fusion(%dot.3), kind=kLoop, calls=%fused_computation.7
}
"""


def test_instruction_scopes_and_phases():
    scopes = trace_summary.instruction_scopes(HLO)
    # A fusion without metadata takes its fused computation's root's.
    assert trace_summary.classify(scopes["loop_tanh_fusion"]) == ("backward", "decoder/layer_*/residual/mlp/tanh")
    assert trace_summary.classify(scopes["dot.3"]) == ("forward", "decoder/layer_*/residual/mlp/up/dot_general")
    assert trace_summary.classify(scopes["copy.2"]) == ("xla-inserted", "copy(state_opt_state_1__0__mu__decoder")
    assert trace_summary.classify("jit(train_step)/jit(_where)/select_n") == ("update+metrics", "jit(_where)/select_n")
    assert trace_summary.classify("jit(step)/vmap(transpose(jvp(GPT)))/decoder/layer_0/mlp/up/dot_general") == (
        "backward", "decoder/layer_*/mlp/up/dot_general")
    table = trace_summary.summarize({"dot.3": 3000.0, "loop_tanh_fusion": 1000.0}, {"dot.3": 2, "loop_tanh_fusion": 2},
                                    scopes, calls=2, step_ms=4.0)
    assert "device time per step 2.00 ms of 4.00 ms wall (50% busy)" in table
    assert "| forward | 1.50 | 75.0% |" in table
    # A kernel known only by its name (no HLO op) maps back through the fusion's name.
    table = trace_summary.summarize({"dot_3": 1.0, "sm90_xmma_gemm": 1.0}, {}, scopes, calls=1)
    assert "| forward | decoder/layer_*/residual/mlp/up/dot_general |" in table
    assert "| unattributed | sm90_xmma_gemm |" in table


def test_bench_rows_start_equal_and_profile(tmp_path, capsys):
    """Every row starts from the same weights and batch, so the baseline and the
    `plain` row (every speed switch off) end at the same loss; the profile of the
    real step attributes kernel time to forward, backward and the update."""
    bench_throughput.main(["--preset", "gpt-tiny", "--batch", "2", "--seq", "16", "--steps", "2",
                           "--matmul-size", "256", "--compare", "plain", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^\| (baseline|plain) \|.*\| ([0-9.]+) \|$", out, re.M)}
    assert set(rows) == {"baseline", "plain"}, out
    assert abs(rows["baseline"] - rows["plain"]) < 1e-4, rows
    phases = dict(re.findall(r"^\| (forward|backward|update\+metrics) \| ([0-9.]+) \|", out, re.M))
    assert set(phases) == {"forward", "backward", "update+metrics"}, out
    assert all(float(v) > 0 for v in phases.values())


def test_kernel_times_reads_device_streams_once(tmp_path):
    """A GPU trace lists each kernel on its stream line and again on derived lines
    ("XLA Ops", "XLA Modules"); only the stream line counts. Host events are ignored."""
    import gzip
    import json
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    kernel = lambda tid, op, dur: {"ph": "X", "pid": 1, "tid": tid, "name": f"k_{op}", "dur": dur,
                                   "args": {"hlo_op": op}}
    events = meta + [kernel(7, "dot.3", 30.0), kernel(7, "dot.3", 10.0), kernel(8, "dot.3", 40.0),
                     {"ph": "X", "pid": 1, "tid": 9, "name": "jit_train_step", "dur": 99.0},
                     {"ph": "X", "pid": 1, "tid": 7, "name": "memcpy", "dur": 5.0},
                     {"ph": "X", "pid": 2, "tid": 3, "name": "host", "dur": 50.0, "args": {"hlo_op": "dot.3"}}]
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    times, counts, source = trace_summary.kernel_times(str(tmp_path))
    assert times == {"dot.3": 40.0, "memcpy": 5.0} and counts == {"dot.3": 2, "memcpy": 1}
    assert source == "kernels on 1 device line(s): Stream #7(Compute)"


def test_cost_only_compiles_rows_without_running(capsys):
    """Rows compile without running; an xla_* field is a compiler option of that row."""
    bench_throughput.main(["--preset", "gpt-tiny", "--batch", "2", "--seq", "16", "--cost-only",
                           "--dtype", "bfloat16", "--compare", "loss_chunk=8",
                           "--compare", "xla_cpu_enable_fast_math=false"])
    rows = re.findall(r"^\| (\S+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$",
                      capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["baseline", "loss_chunk=8", "xla_cpu_enable_fast_math=false"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_random_batch_has_each_tasks_fields_and_ids_in_range():
    """Every task gets its own fields, shapes and dtypes (those of its example batch),
    random integer fields inside the ranges its model accepts, and real-token masks."""
    pretraining = [n for n, t in TASKS.items() if t.with_labels is None]
    configs = {task_for_config(c): c for c in map(get_config, ("bert-tiny", "gpt-tiny",
                                                               "transformer-tiny"))}
    assert set(configs) == set(pretraining)  # a new pre-training task needs a config here
    for name in set(TASKS) - set(pretraining):   # fine-tuning heads are not benchmarked
        with pytest.raises(ValueError, match=f"task={name!r}: the benchmark times pre-training"):
            bench_throughput.random_batch(name, configs["mlm"], 2, 8)
    batch, seq = 8, 24
    for name in pretraining:
        task, config = TASKS[name], configs[name]
        vocab = config.vocab_size
        limits = {"input_ids": vocab, "targets": vocab, "mlm_ids": vocab, "src_ids": vocab,
                  "tgt_in": vocab, "tgt_out": vocab, "token_type_ids": config.type_vocab_size
                  if name == "mlm" else None, "mlm_positions": seq, "nsp_labels": 2}
        got = bench_throughput.random_batch(name, config, batch, seq, seed=5)
        assert sorted(got) == sorted(task.fields), name
        chex.assert_trees_all_equal_shapes_and_dtypes(got, task.example_batch(config, batch, seq))
        for field, value in got.items():
            if np.issubdtype(value.dtype, np.integer):
                assert 0 <= value.min() and value.max() < limits[field], (name, field)
                assert len(np.unique(value)) > 1, (name, field)  # random, not a constant
            else:
                assert np.all(value == 1), (name, field)  # masks and weights: all real
        if name == "mlm":
            assert np.all(np.diff(got["mlm_positions"], axis=1) > 0)  # distinct, sorted


TINY_BENCH = ["--preset", "gpt-tiny", "--batch", "2", "--seq", "16", "--cost-only"]


@pytest.mark.parametrize("module, argv, expect", [
    ("attention_scaling", ["--kinds", "bogus"], "--kinds 'bogus': each must be one of xla,"),
    ("attention_scaling", ["--min-len", "1024", "--max-len", "512"],
     "--min-len 1024 is above --max-len 512"),
    ("attention_scaling", ["--min-len", "600", "--max-len", "1000"], "no power of two lies between"),
    ("attention_scaling", ["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    ("attention_scaling", ["--rounds", "0"], "--rounds 0: must be a positive integer"),
    ("attention_scaling", ["--from-csv", "nope.csv"], "--from-csv 'nope.csv' is not a file"),
    ("attention_scaling", ["--max-len", "0"], "--max-len 0: must be a positive integer"),
    ("attention_scaling", ["--kinds", "linformer", "--modes", "causal"], "no kind runs in these modes"),
    ("bench_throughput", [*TINY_BENCH, "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    ("bench_throughput", [*TINY_BENCH, "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
    ("bench_throughput", [*TINY_BENCH, "--set", "bogus=1"],
     "--set 'bogus=1': 'bogus' is not a field of GPTConfig; valid: activation,"),
    ("bench_throughput", [*TINY_BENCH, "--compare", "num_heads=3"],
     "--compare 'num_heads=3': d_model=128 must be divisible by num_heads=3"),
    ("bench_throughput", [*TINY_BENCH, "--compare", "fast"], "--compare 'fast': expected field=value"),
    ("bench_throughput", [*TINY_BENCH, "--steps", "0"], "--steps 0: must be a positive integer"),
    ("bench_throughput", [*TINY_BENCH, "--steps", "-1"], "--steps -1: must be a positive integer"),
    ("bench_throughput", [*TINY_BENCH, "--batch", "0"], "--batch 0: must be a positive integer"),
    ("bench_throughput", [*TINY_BENCH, "--matmul-size", "0"], "--matmul-size 0: must be a positive integer"),
    ("bench_throughput", [*TINY_BENCH, "--seq", "512"], "--seq 512: row 'baseline' has max_len=256"),
    # cuDNN needs a GPU: found while compiling, it was a traceback (attention_scaling)
    # or a "failed" row with exit status 0 (bench_throughput).
    ("attention_scaling", ["--kinds", "xla,cudnn"], "--kinds cudnn cannot run here: it needs a CUDA"),
    ("bench_throughput", [*TINY_BENCH, "--attention", "cudnn"],
     "row 'baseline': attention.kind='cudnn' cannot run here: it needs a CUDA GPU"),
    ("bench_throughput", [*TINY_BENCH, "--compare", "attention=cudnn"],
     "attention.kind='cudnn' cannot run here"),
    ("bench_hf_bert", ["--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
    ("bench_hf_bert", ["--batch", "-1"], "argument --batch: '-1' is not an integer >= 1"),
    ("bench_hf_bert", ["--seq", "600"], "--seq 600: BERT-base has 512 positions"),
    ("contextual_embeddings", ["--bogus"], "unrecognized arguments: --bogus"),
    ("trace_summary", [], "run python -m experiments.bench_throughput --profile"),
])
def test_bad_experiment_flags_are_usage_errors_before_any_work(module, argv, expect, tmp_path,
                                                              capsys, monkeypatch):
    """Each flag is checked while the arguments are parsed: a usage error (exit status
    2) whose last line names the flag, no traceback, nothing compiled or written."""
    import importlib
    monkeypatch.chdir(tmp_path)
    main_of = importlib.import_module(f"experiments.{module}").main
    out = ["--out", str(tmp_path / "out")] if module == "attention_scaling" else []
    with pytest.raises(SystemExit) as exit_info:
        main_of([*out, *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert expect in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_set_and_compare_values_parse_as_the_config_fields_want():
    """`--set init_std=0.01` is a float, `num_layers=2` an int, `false` a bool, a name
    stays text: a float given as text would be refused by the config's checks."""
    got = bench_throughput._parse_fields("init_std=0.01,norm_eps=1e-6,num_layers=2,"
                                         "scan_layers=false,activation=gelu,rope_base=-3")
    assert got == {"init_std": 0.01, "norm_eps": 1e-6, "num_layers": 2, "scan_layers": False,
                   "activation": "gelu", "rope_base": -3}
    assert type(got["num_layers"]) is int and type(got["init_std"]) is float


def test_a_failed_row_keeps_the_others_and_fails_the_command(monkeypatch, capsys):
    """One failing variant is reported and the other rows' numbers are kept, but the
    exit status says the benchmark did not complete (it was 0)."""
    real = bench_throughput.measure

    def measure(config, *args, **kwargs):
        if not config.fused_qkv:   # the `plain` row
            raise RuntimeError("out of memory (simulated)")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(bench_throughput, "measure", measure)
    status = bench_throughput.main(["--preset", "gpt-tiny", "--batch", "2", "--seq", "16",
                                    "--steps", "1", "--matmul-size", "64", "--compare", "plain"])
    out, err = capsys.readouterr()
    assert status == 1 and "| plain | failed |" in out and "1 row(s) failed: plain" in err
    assert re.search(r"^\| baseline \| [0-9.]+ \|", out, re.M)


def test_attention_scaling_writes_to_runs_and_redraws_an_old_csv(tmp_path, monkeypatch):
    """By default a run goes to runs/, not over the committed reference in
    experiments/results/; a CSV from before the `load` column redraws; a range
    below 2K shows no impossible slope span ("2K-0K")."""
    from experiments import attention_scaling
    assert attention_scaling._parser().parse_args([]).out == "runs/attention_scaling"
    rows = [dict(kind=kind, causal="False", n=n, dtype="float32", device="cpu", time_s=t,
                 peak_mb=1.0, speedup=1.0, memory_ratio=1.0, status="ok")
            for kind, n, t in (("xla", 256, 0.1), ("xla", 512, 0.4), ("chunked", 256, 0.2),
                               ("chunked", 512, 0.5))]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        writer = __import__("csv").DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.chdir(tmp_path)
    attention_scaling.main(["--from-csv", "old.csv", "--out", "redrawn"])
    table = (tmp_path / "redrawn" / "table.md").read_text()
    assert "load average during the run (not recorded)" in table
    assert "0K" not in table and "slope 2K–16K (not run)" in table
    assert (tmp_path / "redrawn" / "scaling.png").stat().st_size > 0
