"""Refine captions with an LLM: translate into English and shorten to fit CLIP's 77 tokens, keeping the findings.

:class:`CaptionRefiner` refines one caption: ask the LLM, measure the answer with the CLIP tokenizer, ask again with
a stricter instruction while it is too long, and finally cut it at a sentence boundary. Requests that fail with a
retryable error are repeated with exponential backoff.

:func:`refine_file` refines a JSONL file into another, resumably: ids already in the output are skipped, records are
appended one line at a time (one write, flush and fsync each), finished lines are never rewritten, and a truncated
last line (a run killed mid-write) is removed and redone. Failed captions are not written, so a rerun retries them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from usclip._io import write_text_atomic
from usclip.refine.backends import Backend, BackendError, Message
from usclip.refine.prompts import clean_answer, first_messages, strict_messages
from usclip.refine.tokens import CLIP_CONTEXT_LENGTH, ClipTokenCounter, cut_to_fit

log = logging.getLogger(__name__)

STATUSES = ("ok", "retried", "cut", "kept")
"""``ok``: the first answer fit; ``retried``: a stricter retry's answer fit; ``cut``: cut after the last retry;
``kept``: already English and fitting, not sent to the LLM (only with ``skip_fitting_english``)."""


@dataclass(frozen=True)
class Refined:
    """One refined caption.

    Attributes:
        caption: the refined caption (fits ``max_tokens`` CLIP tokens).
        tokens: its CLIP token count (start and end tokens included).
        original_tokens: the input caption's CLIP token count.
        status: one of :data:`STATUSES`.
        attempts: LLM answers used (1 when the first answer fit; 0 for ``kept``).
        request_retries: requests repeated after an error.
    """

    caption: str
    tokens: int
    original_tokens: int
    status: str
    attempts: int
    request_retries: int = 0


class CaptionRefiner:
    """Refine single captions with an LLM backend.

    Args:
        backend: the LLM (:class:`~usclip.refine.backends.OpenAICompatibleBackend`,
            :class:`~usclip.refine.backends.TransformersBackend` or anything with ``complete(messages) -> str``).
        max_tokens: the CLIP context length a caption must fit, start and end tokens included.
        length_retries: stricter requests after an answer that is too long, before cutting.
        retries: repeats of a request after a retryable error (HTTP 5xx/408/429, timeout, connection error,
            malformed or empty answer).
        backoff: seconds before the first repeat; doubled for each further repeat.
        max_backoff: the longest wait between repeats (also caps a server's ``Retry-After``).
        skip_fitting_english: pass captions that are plain ASCII and already fit through unchanged (status ``kept``)
            instead of sending them to the LLM.
        counter: CLIP token counter (default: open_clip's ``ViT-B-16`` tokenizer).
        sleep: the wait function (tests pass a fake).
    """

    def __init__(
        self,
        backend: Backend,
        max_tokens: int = CLIP_CONTEXT_LENGTH,
        length_retries: int = 2,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        skip_fitting_english: bool = False,
        counter: Callable[[str], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_tokens < 3:
            raise ValueError(f"max_tokens: expected at least 3 (start, end and one token), got {max_tokens}")
        if length_retries < 0 or retries < 0:
            raise ValueError(f"length_retries, retries: expected >= 0, got {length_retries}, {retries}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff, max_backoff: expected >= 0 seconds, got {backoff}, {max_backoff}")
        self.backend = backend
        self.max_tokens = max_tokens
        self.length_retries = length_retries
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.skip_fitting_english = skip_fitting_english
        self.count = counter or ClipTokenCounter()
        self.sleep = sleep

    def _ask(self, messages: list[Message]) -> tuple[str, int]:
        """The cleaned answer and the number of repeats it took; raises the last :class:`BackendError`."""
        for attempt in range(self.retries + 1):
            try:
                answer = clean_answer(self.backend.complete(messages))
                if not answer:
                    raise BackendError("empty answer", retryable=True)
                return answer, attempt
            except BackendError as err:
                if err.fatal or not err.retryable or attempt == self.retries:
                    raise
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                if err.retry_after is not None:
                    delay = max(delay, min(err.retry_after, self.max_backoff))
                log.info("request failed (%s); retry %d/%d in %.1f s", err, attempt + 1, self.retries, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def refine(self, text: str) -> Refined:
        """Translate and shorten one caption until it fits ``max_tokens`` CLIP tokens.

        Args:
            text: the caption, in any language.

        Returns:
            The refined caption, its token counts, status and attempts.

        Raises:
            BackendError: a request failed after its retries (or failed with a non-retryable error).
        """
        limit, original_tokens = self.max_tokens, self.count(text)
        if self.skip_fitting_english and text.isascii() and original_tokens <= limit:
            return Refined(text, original_tokens, original_tokens, "kept", 0)
        messages = first_messages(text, limit)
        answers: list[tuple[int, str]] = []
        repeats = 0
        for attempt in range(self.length_retries + 1):
            if attempt:
                last_tokens, last_answer = answers[-1]
                messages = strict_messages(text, limit, last_answer, last_tokens)
            answer, n = self._ask(messages)
            repeats += n
            tokens = self.count(answer)
            if tokens <= limit:
                return Refined(answer, tokens, original_tokens, "retried" if attempt else "ok", attempt + 1, repeats)
            log.debug("answer %d is %d CLIP tokens (limit %d)", attempt + 1, tokens, limit)
            answers.append((tokens, answer))
        cut = cut_to_fit(min(answers)[1], limit, self.count)  # cut the shortest answer: it loses the least
        return Refined(cut, self.count(cut), original_tokens, "cut", len(answers), repeats)


@dataclass
class RefineSummary:
    """Counts of one :func:`refine_file` run (``refined`` and below count this run only)."""

    input: str
    output: str
    max_tokens: int
    total: int = 0
    done_before: int = 0
    refined: int = 0
    kept: int = 0
    shortened: int = 0
    retried_for_length: int = 0
    cut: int = 0
    failed: int = 0
    request_retries: int = 0
    failed_ids: list[str] = field(default_factory=list)

    def format(self) -> str:
        """One line for the log."""
        return (
            f"{self.total} captions: {self.done_before} done before, {self.refined} refined "
            f"({self.kept} kept, {self.shortened} shortened, {self.retried_for_length} retried for length, "
            f"{self.cut} cut), {self.failed} failed, {self.request_retries} requests repeated"
        )


def _id_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read_input(path: Path, id_key: str, text_key: str) -> list[dict[str, Any]]:
    """Read the input JSONL: one object per line with ``id_key`` (string or integer) and ``text_key`` (text).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on bad JSON, a missing or wrong key, or a duplicate id (naming the file and line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"input: {path} does not exist")
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: expected a JSON object, got invalid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in (id_key, text_key):
                if key not in record:
                    raise ValueError(f"{where}: key {key!r} missing (keys: {sorted(record)})")
            rid, text = record[id_key], record[text_key]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise ValueError(f"{where}: key {id_key!r} must be a string or an integer, got {rid!r}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: key {text_key!r} must be a non-empty string, got {text!r}")
            if _id_key(rid) in seen:
                raise ValueError(f"{where}: duplicate id {rid!r} (first on line {seen[_id_key(rid)]})")
            seen[_id_key(rid)] = lineno
            records.append(record)
    return records


def read_finished(path: Path, id_key: str) -> set[str]:
    """Ids of the finished lines of an output file; a truncated last line (no newline) is removed from the file.

    Raises:
        ValueError: if a finished line is not a JSON object with ``id_key`` (finished lines are never rewritten:
            fix or remove it by hand).
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: removing a truncated last line (%d bytes; a run stopped mid-write)", path, len(data) - end)
        os.truncate(path, end)
    done: set[str] = set()
    for lineno, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rid = _id_key(record[id_key])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{lineno}: expected a finished JSON record with key {id_key!r}, got {line[:80]!r}; "
                "finished lines are never rewritten, fix or remove it"
            ) from err
        if rid in done:
            log.warning("%s:%d: id %s appears twice", path, lineno, rid)
        done.add(rid)
    return done


def summary_path(output: str | os.PathLike[str]) -> Path:
    """Where :func:`refine_file` writes its summary: ``OUT.jsonl`` -> ``OUT.summary.json``."""
    return Path(output).with_suffix(".summary.json")


def refine_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    refiner: CaptionRefiner,
    id_key: str = "id",
    text_key: str = "caption",
    progress: bool | None = None,
) -> RefineSummary:
    """Refine every caption of a JSONL file into another JSONL file, resumably.

    Each output line holds the input record's other keys plus ``id_key``, ``original`` (the input text),
    ``caption`` (refined), ``tokens``, ``original_tokens``, ``status`` and ``attempts``. The summary is logged and
    written atomically to :func:`summary_path`.

    Args:
        input: the input JSONL file.
        output: the output JSONL file; ids already in it are skipped, new records are appended.
        refiner: the refiner.
        id_key: key of the record id.
        text_key: key of the caption text.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        The run's summary; ``failed`` counts captions whose requests failed (not written: a rerun retries them).

    Raises:
        FileNotFoundError, ValueError: on a missing or malformed input or output file.
        BackendError: on a fatal backend error (HTTP 401/403/404); records written so far are kept.
    """
    in_path, out_path = Path(input), Path(output)
    if in_path.exists() and out_path.exists() and in_path.samefile(out_path):
        raise ValueError(f"output: {out_path} is the input file; expected a different file")
    records = read_input(in_path, id_key, text_key)
    done = read_finished(out_path, id_key)
    summary = RefineSummary(str(in_path), str(out_path), refiner.max_tokens, total=len(records))
    pending = [r for r in records if _id_key(r[id_key]) not in done]
    summary.done_before = len(records) - len(pending)
    if unknown := done - {_id_key(r[id_key]) for r in records}:
        log.warning("%s: %d ids are not in %s (kept as they are)", out_path, len(unknown), in_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        out_path.open("ab", buffering=0) as f,
        tqdm(
            total=len(pending),
            desc="refining captions",
            unit="caption",
            disable=None if progress is None else not progress,
        ) as bar,
    ):
        for record in pending:
            rid, text = record[id_key], record[text_key]
            try:
                result = refiner.refine(text)
            except BackendError as err:
                if err.fatal:
                    raise
                log.warning("caption %s failed: %s", rid, err)
                summary.failed += 1
                summary.failed_ids.append(_id_key(rid))
                bar.update(1)
                continue
            out = {id_key: rid, **{k: v for k, v in record.items() if k not in (id_key, text_key)}}
            out.update(original=text, caption=result.caption, tokens=result.tokens)
            out.update(original_tokens=result.original_tokens, status=result.status, attempts=result.attempts)
            f.write((json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8"))  # one write: a line or nothing
            f.flush()
            os.fsync(f.fileno())
            summary.refined += 1
            summary.kept += result.status == "kept"
            summary.shortened += result.tokens < result.original_tokens
            summary.retried_for_length += result.attempts > 1
            summary.cut += result.status == "cut"
            summary.request_retries += result.request_retries
            bar.update(1)
            bar.set_postfix(cut=summary.cut, failed=summary.failed, refresh=False)
    log.info("%s -> %s: %s", in_path, out_path, summary.format())
    write_text_atomic(summary_path(out_path), json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
    return summary
