"""HF GPT-2 <-> our GPT: which tensor goes where.

HF names (transformers `modeling_gpt2.py`), per layer i under `h.{i}.`:
  ln_1 -> self_attention_norm;  ln_2 -> mlp_norm
  attn.c_attn  (Conv1D [d, 3d], output [q | k | v]) -> self_attention/{query,key,value}
  attn.c_proj  (Conv1D [d, d])                      -> self_attention/out
  mlp.c_fc / mlp.c_proj (Conv1D [in, out])          -> mlp/up / mlp/down
and `wte`, `wpe`, `ln_f` -> embeddings/token, embeddings/position, decoder/final_norm.
`GPT2LMHeadModel` puts these under `transformer.` and adds `lm_head.weight`,
which is `wte.weight` itself unless `tie_word_embeddings` is false.
"""
from __future__ import annotations

from transformer_jax.hf import mapping as m
from transformer_jax.models.configs import GPTConfig

# The causal mask `attn.bias` and `attn.masked_bias` are buffers older
# transformers versions saved; the mask is built from shapes here.
BUFFERS = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)


def layout(config: GPTConfig, *, hf_prefix: str) -> m.Layout:
    """The HF <-> ours map of a GPT-2: `Conv1D` weights are stored `[in, out]` like our
    kernels, the fused `c_attn` `[d, 3*H*hd]` splits into query/key/value kernels
    `[d, H, hd]`, `c_proj` `[H*hd, d]` becomes `[H, hd, d]`. `hf_prefix` is
    "transformer." (`GPT2LMHeadModel`) or "" (`GPT2Model`, and the original OpenAI
    checkpoints)."""
    p = hf_prefix
    entries = [m.copy(f"{p}wte.weight", "embeddings/token/embedding"),
               m.copy(f"{p}wpe.weight", "embeddings/position/embedding")]
    for i in range(config.num_layers):
        src, dst = f"{p}h.{i}.", f"decoder/layer_{i}/"
        entries += m.norm(f"{src}ln_1", f"{dst}self_attention_norm")
        entries += m.fused_qkv(f"{src}attn.c_attn", f"{dst}self_attention", config.num_heads)
        entries += m.heads_out(f"{src}attn.c_proj", f"{dst}self_attention/out", config.num_heads,
                               transpose=False)
        entries += m.norm(f"{src}ln_2", f"{dst}mlp_norm")
        entries += m.conv(f"{src}mlp.c_fc", f"{dst}mlp/up")
        entries += m.conv(f"{src}mlp.c_proj", f"{dst}mlp/down")
    entries += m.norm(f"{p}ln_f", "decoder/final_norm")
    tied = []
    if config.tie_embeddings:
        tied.append(("lm_head.weight", f"{p}wte.weight"))
    else:
        entries += m.dense("lm_head", "lm_head", bias=False)
    return m.Layout(tuple(entries), tuple(tied), BUFFERS)


def hf_prefix(names) -> str:
    """"transformer." when the file's tensor `names` carry it (`GPT2LMHeadModel`), else ""."""
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""
