"""A word-level tokenizer over a small caption vocabulary, saved so ``open_clip.get_tokenizer("local-dir:...")``
loads it through transformers' ``AutoTokenizer`` with no vlkd import.

Why not open_clip's BPE: its 49,408-token vocabulary would put most of a small CLIP's parameters into a text
embedding that captions of a few dozen words never use. Words outside the vocabulary map to ``[UNK]``, so any
prompt tokenizes; lower-casing and punctuation stripping happen in the tokenizer's own normaliser.

Ids: ``[PAD]`` = 0 (open_clip's ``pad_id``), ``[UNK]`` = 1, ``[SOS]`` = 2, the words, then ``[EOS]`` as the
highest id, so open_clip's default ``argmax`` pooling and an explicit ``eos`` pooling pick the same token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"


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
