"""LLM backends for the caption refiner: an OpenAI-compatible HTTP endpoint and a local transformers model.

A backend turns a chat (a list of ``{"role": ..., "content": ...}`` messages) into the model's answer. It does not
retry: it raises :class:`BackendError` with ``retryable`` set for errors worth another try (HTTP 5xx/408/429,
timeouts, connection errors, malformed responses) and ``fatal`` set for errors that every request would hit
(HTTP 401/403/404: wrong key, URL or model name). :class:`usclip.refine.refiner.CaptionRefiner` owns retries and
backoff.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Message = dict[str, str]

# HTTP statuses worth retrying (server busy or broken) and those that no retry or later caption can fix.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})


class BackendError(RuntimeError):
    """A request to the LLM failed.

    Attributes:
        retryable: another try may succeed (server error, rate limit, timeout, connection, malformed answer).
        fatal: no request will succeed (authentication, wrong URL or model): the run should stop.
        retry_after: seconds the server asked to wait (``Retry-After``), if it said.
    """

    def __init__(
        self, message: str, retryable: bool = False, fatal: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.fatal = fatal
        self.retry_after = retry_after


@runtime_checkable
class Backend(Protocol):
    """Anything that answers a chat: ``complete(messages) -> str``."""

    def complete(self, messages: list[Message]) -> str:
        """Return the model's answer to ``messages``; raise :class:`BackendError` on failure."""
        ...


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: ignore, exponential backoff applies
        return None


class OpenAICompatibleBackend:
    """``POST {base_url}/chat/completions``, the API that vLLM, llama.cpp's server, Ollama and OpenAI serve.

    Uses only the standard library (``urllib``). Decoding is greedy (``temperature=0``).

    Args:
        base_url: the API root including the version, e.g. ``http://localhost:8000/v1`` (vLLM),
            ``http://localhost:11434/v1`` (Ollama), ``http://localhost:8080/v1`` (llama.cpp).
        model: model name as the server knows it (e.g. ``Qwen/Qwen3-8B``).
        api_key: sent as ``Authorization: Bearer ...`` when given.
        timeout: seconds per request.
        max_tokens: the most tokens the server may generate per answer.
        extra_body: more JSON fields for every request, e.g. ``{"chat_template_kwargs": {"enable_thinking": false}}``
            for Qwen3 on vLLM.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_tokens: int = 512,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        if not model:
            raise ValueError("model: expected the model name the server serves, got an empty string")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})

    def complete(self, messages: list[Message]) -> str:
        """Send one chat completion request and return the first choice's text."""
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        body.update(self.extra_body)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            raise BackendError(
                f"HTTP {err.code} from {self.url}: {detail}",
                retryable=err.code in RETRY_STATUSES or err.code >= 500,
                fatal=err.code in FATAL_STATUSES,
                retry_after=_retry_after(err.headers.get("Retry-After") if err.headers else None),
            ) from err
        except TimeoutError as err:
            raise BackendError(f"timeout after {self.timeout} s from {self.url}", retryable=True) from err
        except (urllib.error.URLError, ConnectionError) as err:
            raise BackendError(f"cannot reach {self.url}: {err}", retryable=True) from err
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise BackendError(
                f"malformed response from {self.url}: {raw[:300].decode(errors='replace')!r}", retryable=True
            ) from err
        if not isinstance(content, str):
            raise BackendError(f"malformed response from {self.url}: content is {content!r}", retryable=True)
        return content


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


class TransformersBackend:
    """A local causal LM through ``transformers`` (``AutoModelForCausalLM`` + ``AutoTokenizer``), greedy decoding.

    The chat is rendered with the tokenizer's chat template when it has one, else as a plain
    ``System: ... User: ... Assistant:`` prompt.

    Args:
        model: a local folder or a Hugging Face model id (read from the local cache only when ``HF_HUB_OFFLINE`` is
            set).
        max_new_tokens: the most tokens generated per answer.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        dtype: torch dtype name for the weights (``"bfloat16"``, ``"float16"``, ``"float32"``; default ``"auto"``:
            the checkpoint's).
        chat_template_kwargs: extra variables for the chat template; the default turns Qwen3's thinking off (other
            templates ignore unknown variables).
    """

    def __init__(
        self,
        model: str | Path,
        max_new_tokens: int = 256,
        device: str | None = None,
        dtype: str = "auto",
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:  # pragma: no cover - the extra is installed in dev
            raise ImportError("the transformers backend needs `pip install usclip[llm]`") from err
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens}")
        local = _offline()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype, None)
        if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
            raise ValueError(f"dtype: expected auto, bfloat16, float16 or float32, got {dtype!r}")
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model), local_files_only=local)
        auto_model: Any = AutoModelForCausalLM  # transformers' decorators confuse mypy
        self.model: Any = auto_model.from_pretrained(str(model), local_files_only=local, **{dtype_kw: torch_dtype})
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.chat_template_kwargs = {"enable_thinking": False} if chat_template_kwargs is None else chat_template_kwargs

    def _prompt(self, messages: list[Message]) -> tuple[str, bool]:
        """The prompt text and whether the tokenizer should add its special tokens."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
            )
            return str(text), False  # the template writes BOS itself
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join([*turns, "Assistant:"]), True

    def complete(self, messages: list[Message]) -> str:
        """Generate the answer to ``messages`` greedily (at most ``max_new_tokens`` tokens)."""
        import torch

        text, special = self._prompt(messages)
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=special).to(self.device)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )  # (1, prompt + new)
        new = out[0, inputs["input_ids"].shape[1] :]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))
