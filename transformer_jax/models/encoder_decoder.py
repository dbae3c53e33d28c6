"""The original encoder-decoder Transformer (Vaswani et al. 2017, arXiv 1706.03762)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.embeddings import Embeddings
from transformer_jax.models.common import check_length, key_padding_mask
from transformer_jax.models.configs import EncoderDecoderConfig
from transformer_jax.stacks import Decoder, Encoder


class EncoderDecoder(nn.Module):
    """(src_ids `[..., S]`, tgt_ids `[..., T]`) -> logits `[..., T, vocab]`.

    One embedding table serves source, target and the output projection, as in
    the paper (sec. 3.4). Masks `[..., S]` / `[..., T]`: True/1 on real tokens."""
    config: EncoderDecoderConfig

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, arch="encoder_decoder", num_decoder_layers=cfg.num_decoder_layers)
        self.decoder = Decoder(cfg.decoder_config(), arch="encoder_decoder",
                               num_encoder_layers=cfg.num_layers, cross_attention=True)

    def encode(self, src_ids, src_mask=None, *, deterministic=True):
        """-> memory `[..., S, d_model]`."""
        check_length(src_ids, self.config.max_len, "src_ids")
        x = self.embeddings(src_ids, deterministic=deterministic)
        return self.encoder(x, key_padding_mask(src_mask, src_ids, "src_mask"),
                            deterministic=deterministic)

    def decode(self, memory, tgt_ids, src_mask=None, tgt_mask=None, *, src_ids=None,
               deterministic=True, decode=False):
        """memory `[..., S, d_model]`, tgt_ids `[..., T]` -> logits `[..., T, vocab]`;
        masks `[..., S]` / `[..., T]` are True/1 on real tokens. `decode=True` appends
        to the "cache" collection (the decoder's self-attention keys/values and the
        target position) instead of attending only within `tgt_ids`, and projects
        `memory` to the cross-attention keys/values on the first call only: later
        calls read them from the cache (their `memory` sets only the shape). See
        `models/seq2seq_generate.py`."""
        check_length(tgt_ids, self.config.max_len, "tgt_ids")
        positions = jnp.arange(tgt_ids.shape[-1])
        if decode:
            positions = self._decode_positions(positions)
        x = self.embeddings(tgt_ids, positions=positions, deterministic=deterministic)
        memory_mask = None if src_mask is None else key_padding_mask(
            src_mask, src_ids if src_ids is not None else src_mask, "src_mask")
        x = self.decoder(x, memory, mask=key_padding_mask(tgt_mask, tgt_ids, "tgt_mask"),
                         memory_mask=memory_mask, deterministic=deterministic, decode=decode)
        return self.embeddings.attend(x)

    def _decode_positions(self, positions):
        """Offsets `positions` by the tokens already decoded, as `GPT` does; on the call
        that creates the cache (sized by its input) nothing is offset or counted."""
        if not self.has_variable("cache", "position_index"):
            self.put_variable("cache", "position_index", jnp.array(0, jnp.int32))
            return positions
        index = self.get_variable("cache", "position_index")
        self.put_variable("cache", "position_index", index + positions.shape[-1])
        return index + positions

    def __call__(self, src_ids, tgt_ids, src_mask=None, tgt_mask=None, *, deterministic=True):
        """src_ids `[..., S]`, tgt_ids `[..., T]` (teacher-forced) -> logits `[..., T, vocab]`."""
        memory = self.encode(src_ids, src_mask, deterministic=deterministic)
        return self.decode(memory, tgt_ids, src_mask, tgt_mask, src_ids=src_ids,
                           deterministic=deterministic)
