"""A RoBERTa tokenizer (byte-level BPE) learned offline from a list of texts: the bundled model's captions,
or a test's prompts. RoBERTa's special tokens keep their usual ids (<s> 0, <pad> 1, </s> 2), which a CLAP text
config assumes."""

from __future__ import annotations

import tempfile
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts: list[str], folder: str | Path, vocab_size: int = 400, model_max_length: int = 77):
    """Learn the merges from `texts`, save the tokenizer in `folder` (transformers' layout) and return it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        bpe.save_model(scratch)
        tokenizer = RobertaTokenizer(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"),
                                     model_max_length=model_max_length)
        tokenizer.save_pretrained(str(folder))
    return tokenizer
