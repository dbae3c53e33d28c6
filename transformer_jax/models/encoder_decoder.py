"""The original encoder-decoder Transformer (Vaswani et al. 2017, arXiv 1706.03762)."""
from __future__ import annotations

import flax.linen as nn

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
               deterministic=True):
        """memory `[..., S, d_model]`, tgt_ids `[..., T]` -> logits `[..., T, vocab]`;
        masks `[..., S]` / `[..., T]` are True/1 on real tokens."""
        check_length(tgt_ids, self.config.max_len, "tgt_ids")
        x = self.embeddings(tgt_ids, deterministic=deterministic)
        memory_mask = None if src_mask is None else key_padding_mask(
            src_mask, src_ids if src_ids is not None else src_mask, "src_mask")
        x = self.decoder(x, memory, mask=key_padding_mask(tgt_mask, tgt_ids, "tgt_mask"),
                         memory_mask=memory_mask, deterministic=deterministic)
        return self.embeddings.attend(x)

    def __call__(self, src_ids, tgt_ids, src_mask=None, tgt_mask=None, *, deterministic=True):
        """src_ids `[..., S]`, tgt_ids `[..., T]` (teacher-forced) -> logits `[..., T, vocab]`."""
        memory = self.encode(src_ids, src_mask, deterministic=deterministic)
        return self.decode(memory, tgt_ids, src_mask, tgt_mask, src_ids=src_ids,
                           deterministic=deterministic)
