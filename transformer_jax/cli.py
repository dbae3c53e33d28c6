"""Command line: `transformer-jax {train,generate,embed,info}` (also `python -m transformer_jax`).

Arguments are validated before any work starts; a bad value prints one line
naming the flag, the value and what is valid, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

# `train` flag -> (RunConfig field, argparse options). Defaults are RunConfig's own, shown
# in --help; argparse stores only the flags that were typed (default=SUPPRESS), so that
# --resume can take every other setting from the saved run.
TRAIN_FLAGS = {
    "--model": ("model", dict(help="preset name (see `info`)")),
    "--task": ("task", dict(help="mlm (BERT MLM+NSP) | lm (GPT) | seq2seq")),
    "--data": ("data", dict(help="text file/dir, hf:NAME, or stdlib:local (this Python's "
                                 "stdlib); none: the embedded stdlib snapshot")),
    "--max-documents": ("max_documents", dict(type=int, help="cap the corpus (quick runs)")),
    "--vocab-size": ("vocab_size", dict(type=int, help="tokenizer vocabulary trained on the corpus")),
    "--seq-len": ("seq_len", dict(type=int, help="tokens per example; at most the preset's max_len")),
    "--batch-size": ("batch_size", dict(type=int)),
    "--steps": ("steps", dict(type=int, help="optimizer updates")),
    "--lr": ("lr", dict(type=float, help="peak learning rate")),
    "--warmup": ("warmup", dict(type=int, help="linear warm-up updates; must be < --steps")),
    "--schedule": ("schedule", dict(help="constant | linear | cosine | rsqrt")),
    "--weight-decay": ("weight_decay", dict(type=float)),
    "--clip-norm": ("clip_norm", dict(type=float, help="global gradient norm clip; <= 0 disables")),
    "--accumulation": ("accumulation", dict(type=int, help="micro-batches per update")),
    "--norm-placement": ("norm_placement", dict(help="post | pre | sandwich | deepnorm; none: "
                                                     "the preset's")),
    "--attention": ("attention", dict(help="attention kernel name, e.g. xla, chunked; none: the preset's")),
    "--dtype": ("dtype", dict(help="compute dtype: float32 | bfloat16")),
    "--seed": ("seed", dict(type=int)),
    "--out": ("out_dir", dict(help="run directory")),
    "--resume": ("resume", dict(action="store_true",
                                help="continue the run in --out with its saved settings; flags "
                                     "given with it override them (see --allow-change)")),
    "--allow-change": ("allow_change", dict(
        help="with --resume: comma-separated settings that may differ from the saved run, from "
             "steps, lr, warmup, schedule, weight_decay, clip_norm (the run then no longer "
             "equals an uninterrupted one)")),
    "--stop-at": ("stop_at", dict(type=int, help="save and stop after this many updates, as a "
                                                 "pre-empted job would; --resume continues")),
    "--eval-every": ("eval_every", dict(type=int)),
    "--save-every": ("save_every", dict(type=int)),
    "--peak-tflops": ("peak_tflops", dict(type=float, help="for MFU; none: measured by a matmul")),
    "--parallel": ("parallel", dict(choices=("none", "pmap", "shard"),
                                    help="none: one device; pmap: replicate over local devices; "
                                         "shard: jit over a device mesh (see --mesh)")),
    "--mesh": ("mesh", dict(help="with --parallel shard: axis sizes, e.g. data=2,fsdp=2,tensor=2 "
                                 "(product = device count; none: data=<all devices>)")),
    "--layer-norms": ("layer_norms", dict(action="store_true",
                                          help="also log per-layer gradient and update norms")),
}


def _train_parser(sub, common) -> None:
    from transformer_jax.training.run_config import RunConfig
    p = sub.add_parser("train", parents=[common], help="train a model on the embedded corpus or your text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = RunConfig()
    for flag, (field, options) in TRAIN_FLAGS.items():
        default = getattr(defaults, field)
        shown = {None: "none", (): "none"}.get(default, default) if not isinstance(default, bool) else None
        text = options.get("help", "")
        if shown is not None:
            text = f"{text} (default: {shown})".strip()
        if options.get("action") != "store_true" and "choices" not in options:
            options = {"metavar": flag[2:].upper().replace("-", "_"), **options}
        p.add_argument(flag, dest=field, default=argparse.SUPPRESS, **{**options, "help": text})
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_arg(p) -> None:
    p.add_argument("--model", required=True,
                   help="a run directory from `train`, or a Hugging Face directory with config.json")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `transformer-jax` and its sub-commands."""
    parser = argparse.ArgumentParser(prog="transformer-jax", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="on an error, print its full message (e.g. a storage error's details)")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, common)
    fmt = dict(parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = sub.add_parser("generate", help="prompt -> text from a GPT checkpoint", **fmt)
    _model_arg(g)
    g.add_argument("--prompt", default="def ", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=40, help="a positive integer")
    g.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (1..vocab)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    e = sub.add_parser("embed", help="text -> vectors from a BERT checkpoint", **fmt)
    _model_arg(e)
    e.add_argument("--text", action="append", required=True, help="repeat for several texts")
    e.add_argument("--pooling", default=None, help="cls | mean (default: the model's own)")
    sub.add_parser("info", help="devices, versions and the preset table", **fmt)
    return parser


def _report(command: str, error: BaseException, verbose: bool) -> None:
    """One line on stderr; the rest of a long message and the errors behind it (e.g. a
    storage error with its TensorStore spec) only with --verbose."""
    text = str(error) or type(error).__name__
    first, _, rest = text.partition("\n")
    if not verbose:
        more = " [details: run again with --verbose]" if rest.strip() or error.__cause__ else ""
        print(f"transformer-jax {command}: error: {first}{more}", file=sys.stderr)
        return
    print(f"transformer-jax {command}: error: {text}", file=sys.stderr)
    cause = error.__cause__
    while cause is not None:
        print(f"caused by {type(cause).__name__}: {cause}", file=sys.stderr)
        cause = cause.__cause__


def _quiet_teardown() -> None:
    """After a reported error, Orbax's abandoned asyncio reads can print tracebacks
    ("Event loop is closed") while the interpreter shuts down: through asyncio's logger
    or as unraisable exceptions in `__del__`. The error was reported; keep them out.
    Only for a real process (argv None), never inside a caller's (e.g. pytest's)."""
    import logging
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda unraisable: None


def main(argv=None) -> int:
    """Entry point: parse `argv`, run the sub-command, return its exit code."""
    args = build_parser().parse_args(argv)
    import absl.logging
    # Orbax logs a failed read at ERROR before raising it; the raised error is reported.
    absl.logging.set_verbosity(absl.logging.ERROR if args.verbose else absl.logging.FATAL)
    from transformer_jax import commands
    try:
        return commands.COMMANDS[args.command](args)
    except (ValueError, OSError) as e:   # expected mistakes: bad values, paths, files
        _report(args.command, e, args.verbose)
        if argv is None and not args.verbose:
            _quiet_teardown()
        return 2


if __name__ == "__main__":
    sys.exit(main())
