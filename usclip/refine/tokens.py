"""CLIP token counts and cutting a caption to fit, with open_clip's tokenizer.

A caption fits when its BPE tokens plus the start and end tokens are at most the context length (77 for CLIP):
exactly what ``open_clip``'s tokenizer keeps without truncating.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

CLIP_CONTEXT_LENGTH = 77

# A sentence ends at . ! ? ; (or their CJK forms) followed by white space or the end of the text.
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；])(?:\s+|$)")


@lru_cache(maxsize=4)
def _encoder(model_name: str) -> Callable[[str], list[int]]:
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise ValueError(f"tokenizer of {model_name!r}: expected open_clip's SimpleTokenizer (with encode)")
    return encode


class ClipTokenCounter:
    """Count CLIP tokens (BPE tokens + start + end) of a text, without truncation.

    Args:
        model_name: the open_clip model whose tokenizer counts (``ViT-B-16``: the original CLIP BPE; offline).
    """

    def __init__(self, model_name: str = "ViT-B-16") -> None:
        self.model_name = model_name
        self._encode = _encoder(model_name)

    def __call__(self, text: str) -> int:
        """Number of tokens ``text`` takes in the CLIP context, start and end tokens included."""
        return len(self._encode(text)) + 2


def split_sentences(text: str) -> list[str]:
    """Split ``text`` after each sentence end (``.``, ``!``, ``?``, ``;``), keeping the punctuation."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _longest_prefix(parts: list[str], sep: str, fits: Callable[[str], bool]) -> str:
    """The longest ``sep.join(parts[:k])`` that fits (binary search; fitting is monotone in ``k``)."""
    lo, hi = 0, len(parts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(sep.join(parts[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return sep.join(parts[:lo])


def cut_to_fit(text: str, limit: int, count: Callable[[str], int]) -> str:
    """Cut ``text`` to ``count(result) <= limit``: at the last sentence boundary that fits, else at a word boundary.

    A first word too long on its own (e.g. unspaced CJK text) is cut at a character.

    Args:
        text: the caption.
        limit: the most tokens allowed (start and end tokens included).
        count: the token counter.

    Returns:
        ``text`` itself when it fits; else the longest fitting prefix of whole sentences, or of whole words (with a
        ``.`` added when it fits), or of characters.
    """
    text = " ".join(text.split())
    if count(text) <= limit:
        return text

    def fits(s: str) -> bool:
        return count(s) <= limit

    best = _longest_prefix(split_sentences(text), " ", fits)
    if best:
        return best
    best = _longest_prefix(text.split(" "), " ", fits).rstrip(",:;-–— ")
    if best:
        return best + "." if fits(best + ".") and not best.endswith((".", "!", "?")) else best
    return _longest_prefix(list(text), "", fits)
