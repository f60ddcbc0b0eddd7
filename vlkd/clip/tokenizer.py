"""A word-level tokenizer over a small caption vocabulary, saved so ``open_clip.get_tokenizer("local-dir:...")``
loads it through transformers' ``AutoTokenizer`` with no vlkd import.

Why not open_clip's BPE: its 49,408-token vocabulary would put most of a small CLIP's parameters into a text
embedding that captions of a few dozen words never use. Words outside the vocabulary map to ``[UNK]``, so any
prompt tokenizes; lower-casing and punctuation stripping happen in the tokenizer's own normaliser.

Ids: ``[PAD]`` = 0 (open_clip's ``pad_id``), ``[UNK]`` = 1, ``[SOS]`` = 2, the words, then ``[EOS]`` as the
highest id, so open_clip's default ``argmax`` pooling and an explicit ``eos`` pooling pick the same token.

``TextTokenizer`` wraps whichever tokenizer a CLIP reads (open_clip's BPE, a Hugging Face tokenizer, this one)
for distillation: texts -> token ids, an identity for cache keys, and saving its files beside an export.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
# open_clip text_cfg keys that say which tokenizer a text tower reads.
TOKENIZER_KEYS = ("context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def caption_words(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` (lower-cased, punctuation dropped) in first-seen order."""
    words: dict[str, None] = {}
    for text in texts:
        words.update(dict.fromkeys(re.sub(r"[^\w\s]", " ", text.lower()).split()))
    return list(words)


def build_word_tokenizer(words: Iterable[str], context_length: int):
    """A ``PreTrainedTokenizerFast``: ``[SOS] words [EOS]``, padded with ``[PAD]`` to ``context_length``."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(words) if w not in (PAD, UNK, SOS, EOS)]
    vocab = {PAD: 0, UNK: 1, SOS: 2, **{w: i + 3 for i, w in enumerate(words)}, EOS: len(words) + 3}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOS} $A {EOS}", special_tokens=[(SOS, vocab[SOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=context_length, padding_side="right", truncation_side="right",
    )


def save_word_tokenizer(tokenizer, folder: str | Path) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    paths = [Path(p) for p in tokenizer.save_pretrained(str(folder))]
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 names its own backend class here, which transformers 4 cannot load; both load this name.
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return paths


@dataclass
class TextTokenizer:
    """Texts -> (N, context_length) int64 token ids, and how to save the tokenizer beside an exported model."""

    tokenizer: Any  # open_clip SimpleTokenizer or HFTokenizer
    context_length: int
    name: str  # what it is, for messages: "open_clip BPE", a hub id, or a folder
    folder: Path | None = None  # local tokenizer files, copied on export as they are

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @property
    def identity(self) -> str:
        """Changes whenever the ids it produces may change (a cache key part)."""
        digest = hashlib.sha256(f"{self.name}|{self.context_length}".encode())
        for path in self.files():
            digest.update(path.name.encode() + path.read_bytes())
        return digest.hexdigest()[:16]

    def files(self) -> list[Path]:
        """The local tokenizer files (none for open_clip's built-in BPE or a hub tokenizer)."""
        return [self.folder / n for n in TOKENIZER_FILES if self.folder and (self.folder / n).is_file()]

    def save(self, folder: Path) -> None:
        """Write the tokenizer's files into ``folder`` (nothing for open_clip's BPE: open_clip uses it whenever a
        config names no ``hf_tokenizer_name``)."""
        if self.folder is not None:
            for path in self.files():
                shutil.copyfile(path, Path(folder) / path.name)
        elif hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(folder))


def open_clip_tokenizer(text_cfg: dict, folder: Path | None = None) -> TextTokenizer:
    """The tokenizer an open_clip ``text_cfg`` reads; for a local dir its files are in ``folder``."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    context_length = int(text_cfg.get("context_length", 77))
    hf_name = text_cfg.get("hf_tokenizer_name")
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if not hf_name:
        return TextTokenizer(SimpleTokenizer(context_length=context_length, **kwargs), context_length, "open_clip BPE")
    # open_clip reads a local dir's own files whatever the name says; do the same.
    source = str(folder) if folder is not None else hf_name
    tokenizer = HFTokenizer(source, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                            **kwargs)
    return TextTokenizer(tokenizer, context_length, hf_name if folder is None else str(folder), folder)


def tokenizer_signature(text_cfg: dict) -> dict:
    """The tokenizer-defining part of a text_cfg, with open_clip's defaults filled in (for comparisons)."""
    defaults = {"context_length": 77, "vocab_size": 49408, "hf_tokenizer_name": None, "tokenizer_mode": None,
                "tokenizer_kwargs": None}
    return {key: text_cfg.get(key, defaults[key]) or defaults[key] for key in TOKENIZER_KEYS}


def describe_tokenizer(signature: dict) -> str:
    """'NAME, vocabulary V, context C' for messages."""
    name = signature["hf_tokenizer_name"] or "open_clip BPE"
    return f"{name}, vocabulary {signature['vocab_size']}, context {signature['context_length']}"
