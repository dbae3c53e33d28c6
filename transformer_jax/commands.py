"""What each `transformer-jax` subcommand does (argument parsing is in cli.py)."""
from __future__ import annotations

import json
import platform

import numpy as np

from transformer_jax.training.run_files import dumps


def _typed_run_settings(args) -> dict:
    """RunConfig fields of the flags the user typed (argparse keeps no defaults)."""
    from transformer_jax.cli import TRAIN_FLAGS
    given = {field: getattr(args, field) for field, _ in TRAIN_FLAGS.values() if hasattr(args, field)}
    if "clip_norm" in given and given["clip_norm"] <= 0:
        given["clip_norm"] = None   # --clip-norm 0 disables clipping
    if "allow_change" in given:
        given["allow_change"] = tuple(k.strip().replace("-", "_")
                                      for k in given["allow_change"].split(",") if k.strip())
    return given


def _run_config(args):
    """-> (RunConfig, one line saying what a --resume resumed, or None)."""
    from transformer_jax.training.run_config import RunConfig
    from transformer_jax.training.runner import saved_run
    given = _typed_run_settings(args)
    if not given.get("resume"):
        return RunConfig(**given), None
    out = given.get("out_dir", RunConfig().out_dir)
    saved, step = saved_run(out)
    run = RunConfig.resumed(saved, given)
    changed = [f"--{k.replace('_', '-')} {v!r}" for k, v in given.items()
               if k not in ("resume", "out_dir", "allow_change") and getattr(saved, k) != v]
    status = _saved_status(out)
    note = (f"resuming {out} at step {step} of {run.steps}: a {run.model} {run.task} run with its "
            f"saved settings" + (f", changed: {', '.join(changed)}" if changed else ""))
    if status.get("status") == "diverged":
        note += (f"; it diverged at step {status.get('diverged_at')}, so this continues from its "
                 "last good checkpoint" + ("" if changed else
                                           " (unchanged settings diverge again; see --allow-change)"))
    return run, note


def _saved_status(out) -> dict:
    from pathlib import Path
    try:
        return json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def train(args) -> int:
    """`transformer-jax train`: one run of `training.runner`; prints the summary (a diverged
    run is reported as such, with its step, not raised). With --resume, the settings are
    the saved run's, overridden only by the flags given."""
    from transformer_jax.training.runner import train as run_training
    run, note = _run_config(args)
    if note:
        print(note, flush=True)
    summary = run_training(run, progress=not args.no_progress)
    shown = {k: summary.get(k) for k in ("status", "diverged_at", "step", "initial_val_loss",
                                         "final_val_loss", "tokens_per_sec", "mfu", "mfu_range",
                                         "loss_spikes")}
    print(dumps(shown, indent=2))
    print(f"run directory: {run.out_dir} (metrics.jsonl, summary.json, loss.png, checkpoints/)")
    return 0


def _load(path):
    """-> (config, params, tokenizer, pooling) from a run dir or a Hugging Face dir."""
    from pathlib import Path
    from transformer_jax.training.loading import is_run_dir, load_run
    if is_run_dir(path):
        config, params, tokenizer, _ = load_run(path)
        return config, params, tokenizer, "cls"
    if (Path(path) / "config.json").is_file():
        from transformer_jax.data import Tokenizer
        from transformer_jax.hf import load_pretrained
        pre = load_pretrained(path)
        if pre.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json or vocab.txt; the CLI needs one")
        pooling = pre.pooling.mode if pre.pooling is not None else "cls"
        return pre.config, pre.params, Tokenizer(pre.tokenizer), pooling
    raise ValueError(f"--model {path!r} is neither a run directory (with checkpoints/) nor a "
                     "Hugging Face directory (with config.json)")


def _check_sampling(args) -> None:
    """The sampling flags, before any checkpoint is read."""
    import math
    checks = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "a positive integer"),
              ("--temperature", args.temperature,
               math.isfinite(args.temperature) and args.temperature >= 0, "a number >= 0 (0 = greedy)"),
              ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "a positive integer"),
              ("--top-p", args.top_p, args.top_p is None or 0.0 < args.top_p <= 1.0, "in (0, 1]"))
    for flag, value, ok, valid in checks:
        if not ok:
            raise ValueError(f"{flag} {value!r} is not valid: must be {valid}")


def generate(args) -> int:
    """`transformer-jax generate`: sample continuations of --prompt with the KV cache."""
    import jax
    from transformer_jax.models import GPT, GPTConfig, generate as sample
    _check_sampling(args)
    config, params, tokenizer, _ = _load(args.model)
    if not isinstance(config, GPTConfig):
        raise ValueError(f"--model {args.model!r} holds a {type(config).__name__}; generate needs a GPT")
    params = params.get("gpt", params) if isinstance(params, dict) else params
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens")
    out = sample(GPT(config), params, np.asarray([ids]), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 eos_id=tokenizer.eos_id, rng=jax.random.PRNGKey(args.seed))
    tokens = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
    print(tokenizer.decode(tokens))
    return 0


def embed(args) -> int:
    """`transformer-jax embed`: one JSON line with the sentence vector of each --text."""
    from transformer_jax.models import BertConfig, BertForSentenceEmbedding
    config, params, tokenizer, pooling = _load(args.model)
    if not isinstance(config, BertConfig):
        raise ValueError(f"--model {args.model!r} holds a {type(config).__name__}; embed needs a BERT")
    pooling = args.pooling or pooling
    # [CLS] text [SEP], as in pretraining (Devlin et al. 2018) and HF's post-processor.
    wrap = [i for i in (tokenizer.cls_id,) if i is not None], [i for i in (tokenizer.sep_id,) if i is not None]
    encoded = [(wrap[0] + tokenizer.encode(t)[: config.max_len - 2] + wrap[1]) for t in args.text]
    width = max(len(e) for e in encoded)
    ids = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for i, e in enumerate(encoded):
        ids[i, :len(e)], mask[i, :len(e)] = e, True
    model = BertForSentenceEmbedding(config, pooling=pooling)
    bert = {"bert": params["bert"]} if "bert" in params else {"bert": params}
    vectors = np.asarray(model.apply({"params": bert}, ids, attention_mask=mask))
    for text, v in zip(args.text, vectors):
        print(json.dumps({"text": text, "dim": int(v.shape[-1]),
                          "vector": [round(float(x), 6) for x in v]}))
    return 0


def info(args) -> int:
    """`transformer-jax info`: versions, devices and the table of model presets."""
    import flax
    import jax
    import optax
    from transformer_jax.models import PRESETS, get_config
    print(f"python {platform.python_version()}  jax {jax.__version__}  flax {flax.__version__}  "
          f"optax {optax.__version__}")
    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    print(f"{'preset':18} {'family':22} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>6} {'max_len':>7}")
    for name in PRESETS:
        c = get_config(name)
        print(f"{name:18} {type(c).__name__:22} {c.num_layers:6d} {c.d_model:7d} {c.num_heads:5d} "
              f"{c.d_ff:6d} {c.max_len:7d}")
    return 0


COMMANDS = {"train": train, "generate": generate, "embed": embed, "info": info}
