"""Efficient attention variants; importing this package registers them by name in
`transformer_jax.attention.registry`, selected with `AttentionConfig(kind=...)`:

  chunked     exact softmax in O(n) memory (Rabe & Staats 2021)
  local       sliding window (Beltagy et al. 2020, Sec. 3.1)
  longformer  sliding window + global tokens (Beltagy et al. 2020)
  bigbird     window + global + random blocks (Zaheer et al. 2020, ITC)
  linformer   learned sequence projections of K, V (Wang et al. 2020)
  linear      elu+1 kernelized attention (Katharopoulos et al. 2020)
  performer   FAVOR+ positive orthogonal random features (Choromanski et al. 2020)
  splash, splash_local, splash_longformer
              the Pallas TPU block-sparse flash kernel (full/causal, window, window + globals)
"""
from transformer_jax.attention.variants import (bigbird, chunked, linear, linformer,  # noqa: F401
                                                local, longformer, performer, splash)
from transformer_jax.attention.variants.linear import (linear_attention_init_state,
                                                       linear_attention_recurrent_step)

__all__ = ["linear_attention_init_state", "linear_attention_recurrent_step"]
