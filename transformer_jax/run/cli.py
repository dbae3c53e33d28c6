"""Command line: `transformer-jax {train,generate,embed,predict,info}` (also `python -m transformer_jax`).

Arguments are validated before any work starts; a bad value prints one line
naming the flag, the value and what is valid, and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

def train_flags() -> dict[str, tuple[str, dict]]:
    """`train` flag -> (RunConfig field, argparse options), generated from RunConfig's
    fields and their metadata (`run/config.py`), so the flags cannot drift from the
    config. argparse stores only the flags that were typed (default=SUPPRESS), so
    that --resume can take every other setting from the saved run."""
    from transformer_jax.run.config import RunConfig
    from transformer_jax.training.tasks import TASKS
    flags = {}
    for field in dataclasses.fields(RunConfig):
        meta = field.metadata
        if not meta.get("cli", False):
            continue
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        help_text = meta["help"].replace("{tasks}", " | ".join(TASKS))
        if isinstance(field.default, bool):
            options = dict(action="store_true", help=help_text)
        else:
            shown = "none" if field.default in (None, ()) else field.default
            options = dict(type=meta["type"] or type(field.default),
                           help=f"{help_text} (default: {shown})".strip())
            if meta["choices"]:
                options["choices"] = meta["choices"]
            else:
                options["metavar"] = flag[2:].upper().replace("-", "_")
        flags[flag] = (field.name, options)
    return flags


def typed_settings(args) -> dict:
    """RunConfig fields of the `train` flags the user typed, each through its field's
    `parse` (e.g. --clip-norm 0 -> None, --allow-change a,b -> ("a", "b"))."""
    from transformer_jax.run.config import RunConfig
    parse = {f.name: f.metadata.get("parse") for f in dataclasses.fields(RunConfig)}
    given = {field: getattr(args, field) for field, _ in train_flags().values() if hasattr(args, field)}
    return {k: parse[k](v) if parse[k] else v for k, v in given.items()}


def _train_parser(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model on the embedded corpus or your text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, (field, options) in train_flags().items():
        p.add_argument(flag, dest=field, default=argparse.SUPPRESS, **options)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar or status lines (what --init loaded is still said)")


def _model_arg(p) -> None:
    p.add_argument("--model", required=True,
                   help="a run directory from `train`, or a Hugging Face directory with config.json")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `transformer-jax` and its sub-commands."""
    from transformer_jax.run.generation import DEFAULT_PROMPT   # numpy only: light
    parser = argparse.ArgumentParser(prog="transformer-jax", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="on an error, print its full message (e.g. a storage error's details)")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, common)
    fmt = dict(parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = sub.add_parser("generate", help="prompt -> text from a GPT or encoder-decoder run", **fmt)
    _model_arg(g)
    g.add_argument("--prompt", default=None,
                   help="text to continue (GPT) or translate (seq2seq); none and no "
                        f"--input-file: {DEFAULT_PROMPT!r}")
    g.add_argument("--input-file", default=None,
                   help="a UTF-8 file with one input per line (instead of --prompt)")
    g.add_argument("--beam-size", type=int, default=1,
                   help="seq2seq: beam search with this many beams (1 = greedy/sampling)")
    g.add_argument("--length-penalty", type=float, default=0.6,
                   help="beam search: alpha of ((5 + |Y|) / 6)^alpha (Wu et al. 2016)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="a positive integer")
    g.add_argument("--temperature", type=float, default=0.8,
                   help=">= 0; 0 = greedy (beam search does not sample: not used there)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k likeliest tokens (1..vocab)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    e = sub.add_parser("embed", help="text -> vectors from a BERT checkpoint", **fmt)
    _model_arg(e)
    e.add_argument("--text", action="append", required=True, help="repeat for several texts")
    e.add_argument("--pooling", default=None, help="cls | mean (default: the model's own)")
    pr = sub.add_parser("predict", help="text -> labels or tags from a classify / tag run", **fmt)
    _model_arg(pr)
    pr.add_argument("--text", action="append", default=None,
                    help="a text to label (tag: whitespace-separated words); repeatable")
    pr.add_argument("--text-pair", default=None, help="classify: the second text of a pair")
    pr.add_argument("--input-file", default=None,
                    help=".jsonl records with the training fields, or one text per line")
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
    from transformer_jax.run import commands
    try:
        return commands.COMMANDS[args.command](args)
    except (ValueError, OSError) as e:   # expected mistakes: bad values, paths, files
        _report(args.command, e, args.verbose)
        if argv is None and not args.verbose:
            _quiet_teardown()
        return 2


if __name__ == "__main__":
    sys.exit(main())
