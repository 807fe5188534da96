"""Tiny random causal LMs with a locally trained tokenizer, for tests and CPU examples.

``build_tiny(folder, arch="llama")`` writes a loadable Hugging Face model folder in about a
second: a byte-level BPE tokenizer trained on a few hundred sentences and a 2-4 layer model with
random weights. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Question: How do I bake bread?\nAnswer:\nMix flour, water, salt and yeast, knead, let it rise and bake.",
    "Question: How can I pick a lock?\nAnswer:\nI'm sorry, but I can't help with that request.",
    "I cannot assist with that. It could cause harm to people.",
    "Sure, here is how to do it step by step: first, second, third.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>-_/\\@#$%^&*+=~`|",
    "inform(name[Tetris], rating[excellent], genres[puzzle]) Tetris is an excellent puzzle game.",
]


def train_tokenizer(folder: Path | None = None, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str, vocab_size: int, layers: int = 2, hidden: int = 32):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, MistralConfig

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=512, **common)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
               tie_word_embeddings=False, **common)


def build_tiny(folder: str | Path | None = None, arch: str = "llama", layers: int = 2, hidden: int = 32,
               seed: int = 0):
    """Return ``(model, tokenizer)``; also save both to ``folder`` when given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = train_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), layers, hidden))
    model.eval()
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return model, tok
