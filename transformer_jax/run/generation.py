"""`transformer-jax generate`: text from a trained GPT (continuations of prompts)
or encoder-decoder (outputs for sources: greedy, sampled or beam search), one
line of output per input line."""
from __future__ import annotations

import math
import sys

import numpy as np

DEFAULT_PROMPT = "def "   # the embedded corpus is Python's docstrings and code


def check_flags(args) -> None:
    """The sampling and search flags, before any checkpoint is read."""
    checks = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "a positive integer"),
              ("--temperature", args.temperature,
               math.isfinite(args.temperature) and args.temperature >= 0, "a number >= 0 (0 = greedy)"),
              ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "a positive integer"),
              ("--top-p", args.top_p, args.top_p is None or 0.0 < args.top_p <= 1.0, "in (0, 1]"),
              ("--beam-size", args.beam_size, args.beam_size >= 1, "a positive integer (1 = no beam)"),
              ("--length-penalty", args.length_penalty,
               math.isfinite(args.length_penalty) and args.length_penalty >= 0,
               "a number >= 0 (the alpha of Wu et al. 2016, eq. 14)"))
    for flag, value, ok, valid in checks:
        if not ok:
            raise ValueError(f"{flag} {value!r} is not valid: must be {valid}")
    if args.beam_size > 1 and (args.top_k or args.top_p):
        raise ValueError(f"--beam-size {args.beam_size} searches; it takes no --top-k or --top-p "
                         "(sampling flags)")


def inputs(args) -> list[str]:
    """The texts to generate from: --input-file's lines (blank ones skipped), else --prompt
    (`DEFAULT_PROMPT` without either); both at once is a usage error, not one dropped."""
    if args.input_file is None:
        return [DEFAULT_PROMPT if args.prompt is None else args.prompt]
    if args.prompt is not None:
        raise ValueError(f"--prompt {args.prompt!r} and --input-file {args.input_file!r}: "
                         "give one of them (the file's lines are the prompts)")
    from transformer_jax.run.files import input_lines
    return input_lines(args.input_file)


def _encode(tokenizer, texts, flag="--prompt"):
    encoded = [tokenizer.encode(t) for t in texts]
    for i, (text, ids) in enumerate(zip(texts, encoded)):
        if not ids:
            where = flag if len(texts) == 1 else f"input line {i + 1}"
            raise ValueError(f"{where} {text!r} encodes to no tokens")
    return encoded


def gpt(args, config, params, tokenizer) -> list[str]:
    """Continuations of each prompt (sampled with the KV cache; prompts one by one)."""
    import jax
    from transformer_jax.models import GPT, generate
    if args.beam_size > 1:
        raise ValueError(f"--beam-size {args.beam_size}: beam search is for encoder-decoder "
                         "models; a GPT samples (--temperature 0 = greedy)")
    params = params.get("gpt", params) if isinstance(params, dict) else params
    texts = []
    for i, ids in enumerate(_encode(tokenizer, inputs(args))):
        if len(ids) + args.max_new_tokens > config.max_len:
            where = "--prompt" if args.input_file is None else f"--input-file line {i + 1}"
            room = config.max_len - len(ids)
            raise ValueError(f"{where} encodes to {len(ids)} tokens; with --max-new-tokens "
                             f"{args.max_new_tokens} that exceeds the model's max_len="
                             f"{config.max_len}: " + (f"use --max-new-tokens {room} or fewer"
                                                      if room > 0 else "shorten the prompt"))
        out = generate(GPT(config), params, np.asarray([ids]), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tokenizer.eos_id, rng=jax.random.PRNGKey(args.seed))
        texts.append(tokenizer.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()))
    return texts


def seq2seq(args, config, params, tokenizer) -> list[str]:
    """The output of each source line, as one padded batch: beam search with
    --beam-size > 1, else greedy (--temperature 0) or sampling."""
    import jax
    from transformer_jax.models import EncoderDecoder, beam_search_seq2seq, generate_seq2seq
    encoded = _encode(tokenizer, inputs(args))
    long = [i + 1 for i, ids in enumerate(encoded) if len(ids) > config.max_len]
    if long:   # as a translation system truncates its source: said, not silent
        print(f"note: {len(long)} input(s) (first: line {long[0]}) are longer than the model's "
              f"max_len={config.max_len} tokens; only their first {config.max_len} are read",
              file=sys.stderr)
    encoded = [ids[:config.max_len] for ids in encoded]
    width = max(len(e) for e in encoded)
    src = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for i, e in enumerate(encoded):
        src[i, :len(e)], mask[i, :len(e)] = e, True
    model, ids = EncoderDecoder(config), dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                              pad_id=tokenizer.pad_id)
    steps = min(args.max_new_tokens, config.max_len)
    if steps < args.max_new_tokens:
        print(f"note: --max-new-tokens {args.max_new_tokens} is capped at the model's "
              f"max_len={config.max_len}", file=sys.stderr)
    if args.beam_size > 1:
        out = beam_search_seq2seq(model, params, src, mask, beam_size=args.beam_size,
                                  max_new_tokens=steps, length_penalty=args.length_penalty, **ids)
    else:
        out = generate_seq2seq(model, params, src, mask, max_new_tokens=steps,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               rng=jax.random.PRNGKey(args.seed), **ids)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokenizer.decode([t for t in row[:n].tolist() if t != tokenizer.eos_id])
            for row, n in zip(tokens, lengths)]


# model family -> generator: `ModelFamily.commands` says which families generate.
GENERATORS = {"gpt": gpt, "seq2seq": seq2seq}
