"""Models: BERT (+ heads), GPT (+ cached generation) and the encoder-decoder."""
from transformer_jax.models.bert import (BertForMaskedLM, BertForPreTraining,
                                         BertForSentenceEmbedding, BertForSequenceClassification,
                                         BertForTokenClassification, BertModel)
from transformer_jax.models.configs import (PRESETS, BertConfig, EncoderDecoderConfig,
                                            GPTConfig, get_config)
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.generate import GenerateOutput, generate, init_cache
from transformer_jax.models.gpt import GPT
from transformer_jax.models.beam_search import BeamSearchOutput
from transformer_jax.models.seq2seq_generate import (BeamOutput, Seq2SeqOutput, beam_search_seq2seq,
                                                     generate_seq2seq, init_decode_cache)
from transformer_jax.models.registry import (ModelFamily, build, family_of, get_family,
                                             register_family, unregister_family)


__all__ = [
    "BeamOutput", "BeamSearchOutput", "Seq2SeqOutput", "beam_search_seq2seq", "generate_seq2seq",
    "init_decode_cache", "PRESETS", "BertConfig", "BertForMaskedLM", "BertForPreTraining", "BertForSentenceEmbedding",
    "BertForSequenceClassification", "BertForTokenClassification", "BertModel",
    "EncoderDecoder", "EncoderDecoderConfig", "GPT", "GPTConfig", "GenerateOutput", "ModelFamily",
    "build", "family_of", "generate", "get_config", "get_family", "init_cache", "register_family",
    "unregister_family",
]
