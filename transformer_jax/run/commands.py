"""What each `transformer-jax` subcommand does (argument parsing is in cli.py)."""
from __future__ import annotations

import json
import platform

import numpy as np

from transformer_jax.run.files import dumps


def _run_config(args):
    """-> (RunConfig, one line saying what a --resume resumed, or None)."""
    from transformer_jax.run.config import RunConfig
    from transformer_jax.run.loop import saved_run
    from transformer_jax.run.cli import typed_settings
    given = typed_settings(args)
    if not given.get("resume"):
        return RunConfig(**given), None
    out = given.get("out_dir", RunConfig().out_dir)
    saved, step = saved_run(out)
    run = RunConfig.resumed(saved, given)
    _check_stop_at(run, out, step)
    changed = [f"--{k.replace('_', '-')} {v!r}" for k, v in given.items()
               if k not in ("resume", "out_dir", "allow_change") and getattr(saved, k) != v]
    status = _saved_status(out)
    note = (f"resuming {out} at step {_progress_text(step, run)}: a {run.model} {run.task} run "
            f"with its saved settings" + (f", changed: {', '.join(changed)}" if changed else ""))
    if status.get("status") == "diverged":
        note += (f"; it diverged at step {status.get('diverged_at')}, so this continues from its "
                 "last good checkpoint" + ("" if changed else
                                           " (unchanged settings diverge again; see --allow-change)"))
    return run, note


def _progress_text(step: int, run) -> str:
    """`step` micro-steps as the logs count them, of the run's total; with gradient
    accumulation the optimizer update too, which is what --steps and --stop-at count."""
    if run.accumulation == 1:
        return f"{step} of {run.micro_steps}"
    return (f"{step} of {run.micro_steps} (micro-steps; update {step // run.accumulation} of --steps "
            f"{run.steps}, accumulation {run.accumulation})")


def _check_stop_at(run, out, step: int) -> None:
    """A resumed run's --stop-at must lie after its checkpoint (`step` micro-steps, as
    the loop counts them): at or before it, nothing would be trained."""
    if run.stop_at is None or run.stop_at * run.accumulation > step:
        return
    done = step // run.accumulation
    valid = (f"give --stop-at between {done + 1} and {run.steps}, or leave it out to continue "
             "to --steps" if done < run.steps else
             "it has done all its --steps; to train further, raise --steps with --allow-change steps")
    raise ValueError(f"--stop-at {run.stop_at} is not valid with --resume: {out} is already at "
                     f"update {done} of --steps {run.steps}; {valid}")


def _saved_status(out) -> dict:
    from pathlib import Path
    try:
        return json.loads((Path(out) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def train(args) -> int:
    """`transformer-jax train`: one run of `run.loop`; prints the summary (a diverged
    run is reported as such, with its step, not raised). With --resume, the settings are
    the saved run's, overridden only by the flags given."""
    from transformer_jax.run.loop import train as run_training
    run, note = _run_config(args)
    if note:
        print(note, flush=True)
    summary = run_training(run, progress=not args.no_progress)
    shown = {k: summary.get(k) for k in ("status", "diverged_at", "step", "initial_val_loss",
                                         "final_val_loss", "tokens_per_sec", "mfu", "mfu_range",
                                         "loss_spikes")}
    from transformer_jax.run.finetune import is_finetune
    if is_finetune(run.task):   # the metrics of the whole eval file
        shown["final_val_metrics"] = summary.get("final_val_metrics")
    print(dumps(shown, indent=2))
    print(f"run directory: {run.out_dir} (metrics.jsonl, summary.json, loss.png, checkpoints/)")
    return 0


def _load(path):
    """-> (config, params, tokenizer, pooling) from a run dir or a Hugging Face dir."""
    from transformer_jax.run.loading import load_model_dir
    return load_model_dir(path)[:4]


def _require(config, command: str, where) -> None:
    """ValueError unless the model family of `config` supports `command` (its
    `ModelFamily.commands`), naming the families that do."""
    from transformer_jax.models import registry
    family = registry.family_of(config)
    if command not in family.commands:
        able = [f"{f.name} ({f.config_cls.__name__})" for f in registry.families()
                if command in f.commands]
        raise ValueError(f"--model {where!r} holds a {type(config).__name__} ({family.name} "
                         f"family); {command} needs a model of the {' or '.join(able)} family")


def generate(args) -> int:
    """`transformer-jax generate`: text from a GPT (continuations of --prompt) or an
    encoder-decoder run (outputs of the sources), one line per input."""
    from transformer_jax.models import registry
    from transformer_jax.run import generation
    generation.check_flags(args)
    config, params, tokenizer, _ = _load(args.model)
    _require(config, "generate", args.model)
    for text in generation.GENERATORS[registry.family_of(config).name](args, config, params, tokenizer):
        print(text)
    return 0


def embed(args) -> int:
    """`transformer-jax embed`: one JSON line with the sentence vector of each --text."""
    from transformer_jax.models import BertForSentenceEmbedding
    config, params, tokenizer, pooling = _load(args.model)
    _require(config, "embed", args.model)
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
    from transformer_jax.models import PRESETS, family_of, get_config
    from transformer_jax.training.tasks import tasks_of
    print(f"python {platform.python_version()}  jax {jax.__version__}  flax {flax.__version__}  "
          f"optax {optax.__version__}")
    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    print(f"{'preset':18} {'family':8} {'config':22} {'layers':>6} {'d_model':>7} {'heads':>5} "
          f"{'d_ff':>6} {'max_len':>7}  tasks")
    for name in PRESETS:
        c = get_config(name)
        family = family_of(c).name
        print(f"{name:18} {family:8} {type(c).__name__:22} {c.num_layers:6d} {c.d_model:7d} "
              f"{c.num_heads:5d} {c.d_ff:6d} {c.max_len:7d}  {', '.join(tasks_of(family))}")
    return 0


def predict(args) -> int:
    """`transformer-jax predict`: one JSON line per input with its label (classify) or
    its words' tags (tag), from a fine-tuned run directory."""
    from transformer_jax.run.finetune import predict as run_predict
    for record in run_predict(args):
        print(json.dumps(record))
    return 0


COMMANDS = {"train": train, "generate": generate, "embed": embed, "predict": predict, "info": info}
