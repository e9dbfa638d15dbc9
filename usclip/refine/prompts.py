"""The refiner's prompts: translate to English and shorten to fit CLIP's context, keeping every finding."""

from __future__ import annotations

import re

from usclip.refine.backends import Message

SYSTEM_PROMPT = (
    "You rewrite ultrasound report captions for a CLIP text encoder. Translate the caption into English if it is "
    "not English, and shorten it to fit {limit} CLIP tokens (about {words} words). Keep every finding: organ and "
    "location, size and measurements, shape, orientation, margins, echogenicity, composition, echogenic foci and "
    "calcifications, posterior features, vascularity, lymph nodes and the BI-RADS or TI-RADS category with its "
    "subcategory. Drop greetings, template phrases and repetitions; use standard radiology terms and abbreviations "
    "(cm, mm, BI-RADS, TI-RADS). Do not add findings. Answer with the caption only: no quotes, notes or explanations."
)

STRICT_PROMPT = (
    "Your caption is {tokens} CLIP tokens; the limit is {limit} tokens. Rewrite it shorter: at most {words} words, "
    "terse telegraphic style, abbreviations, no articles or filler. Keep every finding and the BI-RADS or TI-RADS "
    "category. Answer with the caption only."
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:(?:refined|english|shortened|rewritten)\s+)?caption\s*:\s*", re.IGNORECASE)
_QUOTES = ('"', "'", "“", "”", "`")


def word_budget(limit: int) -> int:
    """Words that usually fit ``limit`` CLIP tokens in English radiology text (about 1.5 tokens a word)."""
    return max(1, int((limit - 2) / 1.5))


def first_messages(caption: str, limit: int) -> list[Message]:
    """The first request: system instruction and the caption."""
    system = SYSTEM_PROMPT.format(limit=limit, words=word_budget(limit))
    return [{"role": "system", "content": system}, {"role": "user", "content": caption}]


def strict_messages(caption: str, limit: int, answer: str, tokens: int) -> list[Message]:
    """A stricter retry: the chat so far, the measured token count, the limit and a smaller word budget.

    The word budget scales the previous answer's word count by ``limit / tokens`` with a 15 % margin.
    """
    words = max(1, min(word_budget(limit), int(len(answer.split()) * (limit - 2) / max(tokens - 2, 1) * 0.85)))
    return [
        *first_messages(caption, limit),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": STRICT_PROMPT.format(tokens=tokens, limit=limit, words=words)},
    ]


def clean_answer(text: str) -> str:
    """The caption in an LLM answer: thinking blocks, a ``Caption:`` label, wrapping quotes and newlines removed."""
    text = _THINK.sub(" ", text)
    if "<think>" in text.lower():  # unterminated: the answer is all thinking
        return ""
    text = _LABEL.sub("", " ".join(text.split()))
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text
