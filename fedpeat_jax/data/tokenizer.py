"""Tokenizers: train a GPT-2 style byte-level BPE on our own text, or load any HF tokenizer folder.

Everything downstream only needs `encode(str) -> list[int]` plus `eos_token_id` / `pad_token_id`,
which both the tokenizers trained here and real GPT-2's satisfy (as `PreTrainedTokenizerFast`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

EOS_TOKEN = "<|endoftext|>"  # GPT-2's only special token: end of text, and here also bos and pad


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    save_dir=None,
):
    """Train a byte-level BPE (GPT-2's scheme) on `texts`; return a transformers PreTrainedTokenizerFast.

    Byte-level means every string round-trips exactly (no unknown token), whatever the spelling.
    `<|endoftext|>` is id 0 and serves as eos, bos, unk and pad. If `save_dir` is given the tokenizer
    is saved there so that `AutoTokenizer.from_pretrained(save_dir)` (or `load_tokenizer`) loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=int(1e30),  # no implicit truncation; the model's n_positions is enforced elsewhere
        clean_up_tokenization_spaces=False,  # decode(encode(s)) == s
    )
    if save_dir is not None:
        save_tokenizer(tokenizer, save_dir)
    return tokenizer


def save_tokenizer(tokenizer, save_dir) -> Path:
    """Save in Hugging Face format (tokenizer.json + tokenizer_config.json + special_tokens_map.json)."""
    path = Path(save_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer(directory, *, pad_with_eos: bool = True):
    """Load any Hugging Face tokenizer folder (ours, or real GPT-2's) without touching the network.

    GPT-2's own tokenizer has no pad token; with `pad_with_eos` it gets eos as pad, as is customary,
    so padded batches can be built the same way for every tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if pad_with_eos and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_ids(tokenizer) -> tuple:
    """(eos id or None, pad id) of any tokenizer-like object; pad falls back to eos, then 0."""
    eos: Optional[int] = getattr(tokenizer, "eos_token_id", None)
    pad: Optional[int] = getattr(tokenizer, "pad_token_id", None)
    return eos, (pad if pad is not None else (eos if eos is not None else 0))


__all__ = ["EOS_TOKEN", "train_bpe_tokenizer", "save_tokenizer", "load_tokenizer", "special_ids"]
