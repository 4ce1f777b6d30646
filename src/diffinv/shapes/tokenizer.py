"""The shapes model's CLIP tokenizer: a closed vocabulary, one ``word</w>`` token per word.

The merges come from a real greedy byte-pair encoding over the word list (most frequent adjacent pair
first, ties broken by the pair's text), so applying them in rank order rebuilds every word as one token —
naive per-word prefix merges would collide (``r e`` learnt from *red* would split *green* wrongly).
"""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

from .world import VOCABULARY

MODEL_MAX_LENGTH = 16
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def learn_bpe(words: tuple[str, ...] = VOCABULARY) -> list[tuple[str, str]]:
    """Greedy BPE merges that turn every word of ``words`` into a single ``word</w>`` symbol."""
    segmentations = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seg in segmentations.values() for p in zip(seg, seg[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seg in segmentations.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segmentations[w] = out


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Letters (bare and word-final), every merge result in rank order, then the special tokens."""
    symbols = [*string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    symbols += [a + b for a, b in merges]
    symbols += list(SPECIAL_TOKENS)
    return {s: i for i, s in enumerate(dict.fromkeys(symbols))}


def write_tokenizer_files(
    folder: str | Path, words: tuple[str, ...] = VOCABULARY, model_max_length: int = MODEL_MAX_LENGTH
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs for ``words`` to ``folder`` (diffusers layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges), indent=1) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=1) + "\n"
    )
    return folder


def load_tokenizer(folder: str | Path):
    """A ``CLIPTokenizer`` over the files in ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
    )
