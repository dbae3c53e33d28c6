"""Models: BERT (+ heads), GPT (+ cached generation) and the encoder-decoder."""
from transformer_jax.models.bert import (BertForMaskedLM, BertForPreTraining,
                                         BertForSentenceEmbedding, BertForSequenceClassification,
                                         BertForTokenClassification, BertModel)
from transformer_jax.models.configs import (PRESETS, BertConfig, EncoderDecoderConfig,
                                            GPTConfig, get_config)
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.generate import GenerateOutput, generate, init_cache
from transformer_jax.models.gpt import GPT


def build(config):
    """The default model for a config: BertForPreTraining, GPT or EncoderDecoder."""
    if isinstance(config, BertConfig):
        return BertForPreTraining(config)
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, EncoderDecoderConfig):
        return EncoderDecoder(config)
    raise ValueError(f"config of type {type(config).__name__} has no default model; "
                     "expected BertConfig, GPTConfig or EncoderDecoderConfig")


__all__ = [
    "PRESETS", "BertConfig", "BertForMaskedLM", "BertForPreTraining", "BertForSentenceEmbedding",
    "BertForSequenceClassification", "BertForTokenClassification", "BertModel",
    "EncoderDecoder", "EncoderDecoderConfig", "GPT", "GPTConfig", "GenerateOutput", "build",
    "generate", "get_config", "init_cache",
]
