"""Tiny Hugging Face checkpoints written to a directory, with tokenizer files made here (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = '''def greet(name):
    """Return a greeting for name."""
    return "Hello, " + name + "!"


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, n=1):
        self.count += n
        return self.count


for i in range(10):
    print(greet(str(i)), Counter().add(i))
'''


def tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def write(kind: str, directory: Path, seed: int = 0) -> Path:
    """Saves a tiny randomly initialised ``kind`` ("llama" or "gpt2") model and its tokenizer to ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                             bos_token_id=0, eos_token_id=0))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(f"kind must be 'llama' or 'gpt2', got {kind!r}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory
