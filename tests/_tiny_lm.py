"""Tiny local language models for tests: a character-level tokenizer built with ``tokenizers``
and a randomly initialised Llama built from a config (no downloads)."""

from __future__ import annotations

import string

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_lowercase + string.digits + " .,:;?!=+-*/()\n")


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left",
    )  # fmt: skip


def tiny_llama(vocab_size=64, hidden=48, layers=2, heads=4, seed=0, init=0.3, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=256, initializer_range=init, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, **kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model


def tiny_other(arch: str, vocab_size: int, seed: int = 0):
    """Tiny models of other families: learned absolute positions (gpt2), ALiBi without position
    ids (bloom), sliding-window + global layers (gemma2)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=arch == "bloom",  # so that 2 random layers give varied greedy text
    )  # fmt: skip
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=256, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "bloom":
        cfg = tf.BloomConfig(hidden_size=48, n_layer=2, n_head=4, **common)
        cls = tf.BloomForCausalLM
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, sliding_window=8, max_position_embeddings=256,
            **common,
        )  # fmt: skip
        cls = tf.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    cfg.initializer_range = 0.3
    torch.manual_seed(seed)
    return cls(cfg).eval()
