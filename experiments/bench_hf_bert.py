"""The PyTorch reference row of the BERT throughput comparison: Hugging Face
`BertForPreTraining` (MLM + NSP) training steps, timed like `bench_throughput`.

    python -m experiments.bench_hf_bert --batch 32 --seq 512        # on a CUDA GPU

BERT-base config, random tokens, 15% of positions labelled for MLM (the rest -100),
random NSP labels, AdamW (fused where available), bf16 autocast over fp32
weights, `attn_implementation="sdpa"`, dropout off to match our benchmark rows.
HF computes the MLM head at every position; tokens/s are compared as they are.
Prints the median step time over --steps after warm-up, and tokens/s.
"""
from __future__ import annotations

import argparse
import statistics
import time


MAX_POSITIONS = 512   # BERT-base's position table


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value
    return parse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=_at_least(1), default=32, help="sequences per step")
    p.add_argument("--seq", type=_at_least(2), default=512,
                   help=f"tokens per sequence, at most {MAX_POSITIONS} (BERT-base's positions)")
    p.add_argument("--steps", type=_at_least(1), default=20, help="timed steps (median kept)")
    p.add_argument("--warmup", type=_at_least(0), default=5, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="also torch.compile the model")
    args = p.parse_args(argv)
    if args.seq > MAX_POSITIONS:
        p.error(f"--seq {args.seq}: BERT-base has {MAX_POSITIONS} positions")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"this reference needs torch and transformers ({e}); "
                         "pip install -r requirements-hf-test.txt") from e
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"   # PyTorch's fused attention (flash on GPU)
    model = transformers.BertForPreTraining(config).to(device)
    model.train()
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    b, n = args.batch, args.seq
    ids = torch.randint(0, config.vocab_size, (b, n), device=device)
    chosen = torch.rand(b, n, device=device) < 0.15
    chosen[:, 1] = True   # at least one label per row: a loss over no label is NaN
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    types = (torch.arange(n, device=device) >= n // 2).long().expand(b, n)
    nsp = torch.randint(0, 2, (b,), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            out = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids),
                        labels=labels, next_sentence_label=nsp)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    print(f"HF BertForPreTraining ({device}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, sdpa, "
          f"{'bf16 autocast' if device == 'cuda' else 'fp32'}{', compiled' if args.compile else ''}): "
          f"batch {b}x{n}: {dt * 1e3:.2f} ms/step, {b * n / dt:,.0f} tokens/s, loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
