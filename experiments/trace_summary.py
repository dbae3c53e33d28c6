"""Where a compiled step spends its device time: a profiler trace of a few calls,
each kernel mapped back to the JAX code that produced it.

    python -m experiments.bench_throughput --preset gpt2-small --batch 12 --seq 1024 --profile

`jax.profiler.trace` records every kernel (GPU) or thunk (CPU) with the name of
the optimized-HLO instruction it runs (`args.hlo_op`). That instruction's
metadata carries the JAX name stack, e.g.
`jit(train_step)/transpose(jvp(GPT))/decoder/layer_3/.../mlp/up/dot_general`, which
says the phase (`transpose(...)`: backward; `jvp(...)`: forward; neither: the
update and metrics) and the module. Times are summed over every layer
(`layer_*`) and divided by the number of profiled calls, so the tables read in
milliseconds per step, beside the step's wall time: what the kernels do not fill
is launch gaps and host work.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_OPERATION = re.compile(r"=\s*\S+\s+([\w\-]+)\(([^)]*)\)")
_LAYER = re.compile(r"layer_\d+")


def instruction_scopes(hlo_text: str) -> dict[str, str]:
    """{instruction name: JAX name stack} of an optimized HLO module (`compiled.as_text()`).
    A fusion without metadata of its own takes its fused computation's root's."""
    scopes, calls, roots = {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        m = _NAME.match(line)
        if not m:
            if line.rstrip().endswith("{"):   # "%fused_computation.3 (p: f32[2]) -> f32[2] {"
                computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        name = m.group(1)
        op_name, called = _OP_NAME.search(line), _CALLS.search(line)
        if op_name:
            # HLO text escapes quotes in the name stack (params[\'decoder\']): unescape
            scopes[name] = re.sub(r"\\(.)", r"\1", op_name.group(1))
            if line.lstrip().startswith("ROOT") and computation:
                roots[computation] = scopes[name]
        if called:
            calls[name] = called.group(1)
        elif not op_name:   # e.g. a copy XLA inserted: name it by opcode and operand
            what = _OPERATION.search(line)
            if what:
                scopes[name] = f"{what.group(1)}({what.group(2).split(',')[0].strip().lstrip('%')})"
    for name, called in calls.items():
        if name not in scopes and called in roots:
            scopes[name] = roots[called]
    return scopes


def classify(op_name: str | None) -> tuple[str, str]:
    """(phase, scope) of a JAX name stack: phase "backward" / "forward" / "update+metrics"
    (or "xla-inserted": copies and layout changes named by opcode and operand), scope
    the module path with layer numbers merged and the primitive last (for a fusion,
    its root's)."""
    if not op_name:
        return "unattributed", "?"
    if not op_name.startswith("jit("):   # instructions XLA added (copies, layout changes)
        return "xla-inserted", _LAYER.sub("layer_*", op_name.split("____")[0])
    phase = ("backward" if "transpose(" in op_name else
             "forward" if "jvp(" in op_name else "update+metrics")
    # Drop the outer jit and the autodiff wrappers ("jvp(GPT)", "vmap(transpose(jvp(GPT)))").
    parts = [p for p in op_name.split("/")[1:] if "jvp(" not in p and "transpose(" not in p]
    scope = "/".join(_LAYER.sub("layer_*", p) for p in parts)
    scope = re.sub(r"(layer_\*)/\1\.", r"\1/", scope)   # "layer_*/layer_*.residual" -> "layer_*/residual"
    return phase, scope


def kernel_times(trace_dir: str) -> tuple[dict[str, float], dict[str, int], str]:
    """({hlo_op: total µs}, {hlo_op: count}, what was read) from the newest perfetto trace under
    `trace_dir`: on a GPU/TPU the kernels on the device's stream lines (not the
    derived "XLA Ops" / "XLA Modules" lines, which would count them twice), on a
    CPU the thunks that name an HLO op."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir!r}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    devices = {e["pid"] for e in meta if e.get("name") == "process_name"
               and "/device:" in str(e.get("args", {}).get("name", ""))}
    lines = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in meta
             if e.get("name") == "thread_name" and e["pid"] in devices}
    streams = {k for k, name in lines.items() if "stream" in name.lower()}
    keep = streams or {k for k, name in lines.items() if not name.startswith("XLA ")}
    total, count = collections.defaultdict(float), collections.defaultdict(int)
    for e in events:
        if e.get("ph") != "X":
            continue
        op = (e.get("args") or {}).get("hlo_op")
        if devices:
            if (e.get("pid"), e.get("tid")) not in keep:
                continue
            op = op or e.get("name")   # a kernel without an HLO op name: its own name
        if op:
            total[op] += float(e.get("dur", 0.0))
            count[op] += 1
    source = (f"kernels on {len(keep)} device line(s): {', '.join(sorted(lines[k] for k in keep))}"
              if devices else "host thunks (the trace has no device lines)")
    return dict(total), dict(count), source


def summarize(times: dict[str, float], counts: dict[str, int], scopes: dict[str, str],
              calls: int, step_ms: float | None = None, top: int = 30) -> str:
    """Markdown: device ms per step by phase, then the `top` scopes by time."""
    by_phase = collections.defaultdict(float)
    by_scope = collections.defaultdict(lambda: [0.0, 0])
    # A kernel replayed from a CUDA graph may carry no HLO op name, only its kernel
    # name, which XLA derives from the fusion's ("loop_add_fusion.12" ->
    # "loop_add_fusion_12"); library kernels (cuBLAS, cuDNN) stay unattributed.
    by_kernel = {re.sub(r"[.\-]", "_", name): scope for name, scope in scopes.items()}
    for op, us in times.items():
        scope_name = scopes.get(op) or by_kernel.get(op)
        phase, scope = classify(scope_name) if scope_name else ("unattributed", op[:100])
        by_phase[phase] += us
        entry = by_scope[(phase, scope)]
        entry[0] += us
        entry[1] += counts.get(op, 0)
    busy = sum(by_phase.values()) / calls / 1e3
    if not busy:
        return "the trace holds no kernel of this program"
    lines = [f"device time per step {busy:.2f} ms"
             + (f" of {step_ms:.2f} ms wall ({busy / step_ms:.0%} busy)" if step_ms else ""), "",
             "| phase | ms/step | share |", "|---|---|---|"]
    for phase, us in sorted(by_phase.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {phase} | {us / calls / 1e3:.2f} | {us / calls / 1e3 / busy:.1%} |")
    lines += ["", "| phase | scope (all layers) | ms/step | share | kernels/step |", "|---|---|---|---|---|"]
    ranked = sorted(by_scope.items(), key=lambda kv: -kv[1][0])
    for (phase, scope), (us, n) in ranked[:top]:
        lines.append(f"| {phase} | {scope} | {us / calls / 1e3:.3f} | {us / calls / 1e3 / busy:.1%} "
                     f"| {n / calls:.0f} |")
    return "\n".join(lines)


def profile(compiled, args: tuple, calls: int, trace_dir: str, donated: bool = True,
            step_ms: float | None = None, top: int = 30) -> str:
    """Trace `calls` calls of `compiled(*args)` (threading a donated first argument
    through, as the train step needs) into `trace_dir` and summarize them; `step_ms`
    is the untraced wall time per call to compare with (tracing slows the host)."""
    out = compiled(*args)
    jax.block_until_ready(out)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            if donated:
                args = (out[0], *args[1:])
            out = compiled(*args)
        jax.block_until_ready(out)
    times, counts, source = kernel_times(trace_dir)
    return (f"read: {source}\n"
            + summarize(times, counts, instruction_scopes(compiled.as_text()), calls, step_ms, top))


def main(argv=None) -> None:
    """The module is the profile table of `bench_throughput --profile`, not a command of
    its own: --help says so, and anything else is a usage error pointing there."""
    import argparse
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run it through: python -m experiments.bench_throughput --profile [DIR]")
    parser.parse_args(argv)
    parser.error("this module has no command of its own; run python -m "
                 "experiments.bench_throughput --profile [DIR]")


if __name__ == "__main__":
    main()
