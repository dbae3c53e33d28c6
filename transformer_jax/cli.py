"""Command line: `transformer-jax {train,generate,embed,info}` (also `python -m transformer_jax`).

Arguments are validated before any work starts; a bad value prints one line
naming the flag, the value and what is valid, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on the embedded corpus or your text")
    p.add_argument("--model", default="gpt-tiny", help="preset name (see `info`)")
    p.add_argument("--task", default="lm", help="mlm (BERT MLM+NSP) | lm (GPT) | seq2seq")
    p.add_argument("--data", default=None, help="text file/dir, or hf:NAME; default: embedded stdlib corpus")
    p.add_argument("--max-documents", type=int, default=None, help="cap the corpus (quick runs)")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", default="cosine", help="constant | linear | cosine | rsqrt")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0, help="<= 0 disables clipping")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per update")
    p.add_argument("--norm-placement", default=None, help="post | pre | sandwich | deepnorm")
    p.add_argument("--attention", default=None, help="attention kernel name, e.g. xla, chunked")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/default", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; default: measured")
    p.add_argument("--parallel", default="none", choices=("none", "pmap", "shard"),
                   help="none: one device; pmap: replicate over local devices; "
                        "shard: jit over a device mesh (see --mesh)")
    p.add_argument("--mesh", default=None,
                   help="with --parallel shard: axis sizes, e.g. data=2,fsdp=2,tensor=2 "
                        "(product = device count; default data=<all devices>)")
    p.add_argument("--layer-norms", action="store_true",
                   help="also log per-layer gradient and update norms in metrics.jsonl")
    p.add_argument("--no-progress", action="store_true")


def _model_arg(p) -> None:
    p.add_argument("--model", required=True,
                   help="a run directory from `train`, or a Hugging Face directory with config.json")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `transformer-jax` and its sub-commands."""
    parser = argparse.ArgumentParser(prog="transformer-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    g = sub.add_parser("generate", help="prompt -> text from a GPT checkpoint")
    _model_arg(g)
    g.add_argument("--prompt", default="def ")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("embed", help="text -> vectors from a BERT checkpoint")
    _model_arg(e)
    e.add_argument("--text", action="append", required=True, help="repeat for several texts")
    e.add_argument("--pooling", default=None, help="cls | mean (default: the model's own)")
    sub.add_parser("info", help="devices, versions and the preset table")
    return parser


def main(argv=None) -> int:
    """Entry point: parse `argv`, run the sub-command, return its exit code."""
    args = build_parser().parse_args(argv)
    import absl.logging
    absl.logging.set_verbosity(absl.logging.ERROR)
    from transformer_jax import commands
    try:
        return commands.COMMANDS[args.command](args)
    except ValueError as e:
        print(f"transformer-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
