"""``usclip captions``: caption tools.

- ``usclip captions refine IN.jsonl OUT.jsonl --backend openai --base-url URL --model NAME``: translate every
  caption into English and shorten it to fit CLIP's 77 tokens with an LLM (an OpenAI-compatible server such as vLLM,
  llama.cpp or Ollama, or ``--backend transformers --model PATH_OR_ID``). Resumable; exit code 1 when a caption
  failed (rerun to retry it), 2 on bad input or a fatal backend error.

The logic lives in :mod:`usclip.refine`; this module only parses arguments. See docs/captions_refine.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usclip.refine.backends import Backend, BackendError, OpenAICompatibleBackend, TransformersBackend
from usclip.refine.refiner import CaptionRefiner, refine_file, summary_path
from usclip.refine.tokens import CLIP_CONTEXT_LENGTH, ClipTokenCounter

log = logging.getLogger(__name__)


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({err})") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip captions`` argument parser."""
    parser = argparse.ArgumentParser(prog="usclip captions", description="Caption tools (see docs/captions_refine.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{refine}")

    ref = sub.add_parser("refine", help="translate and shorten captions to fit CLIP's context with an LLM")
    ref.add_argument("input", type=Path, help="JSONL file, one object per line with an id and a caption")
    ref.add_argument("output", type=Path, help="JSONL file to append refined captions to (resumed if it exists)")
    ref.add_argument("--backend", choices=("openai", "transformers"), default="openai", help="LLM backend (openai)")
    ref.add_argument("--model", required=True, help="model name on the server, or a transformers path or id")
    ref.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (openai backend)")
    ref.add_argument("--api-key-env", help="environment variable holding the API key (openai backend)")
    ref.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    ref.add_argument("--extra-body", type=_json_object, help="JSON fields added to every request (openai backend)")
    ref.add_argument("--max-new-tokens", type=int, default=256, help="most tokens the LLM generates per answer (256)")
    ref.add_argument("--device", help="transformers backend device (default: cuda if available)")
    ref.add_argument("--dtype", default="auto", help="transformers backend weights dtype (auto)")
    ref.add_argument("--max-tokens", type=int, default=CLIP_CONTEXT_LENGTH, help="CLIP token limit (77)")
    ref.add_argument("--length-retries", type=int, default=2, help="stricter requests before cutting (2)")
    ref.add_argument("--retries", type=int, default=3, help="repeats of a failed request (3)")
    ref.add_argument("--backoff", type=float, default=1.0, help="seconds before the first repeat, doubled after (1)")
    ref.add_argument("--skip-fitting-english", action="store_true", help="keep ASCII captions that already fit")
    ref.add_argument("--clip-model", default="ViT-B-16", help="open_clip model whose tokenizer counts (ViT-B-16)")
    ref.add_argument("--id-key", default="id", help="id key of the JSONL records (id)")
    ref.add_argument("--text-key", default="caption", help="caption key of the JSONL records (caption)")
    ref.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only warnings")
    return parser


def build_backend(args: argparse.Namespace) -> Backend:
    """The backend the arguments ask for."""
    if args.backend == "transformers":
        return TransformersBackend(args.model, max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype)
    if not args.base_url:
        raise ValueError("--base-url: required with --backend openai (e.g. http://localhost:8000/v1)")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env!r} is not set or empty")
    return OpenAICompatibleBackend(
        args.base_url,
        args.model,
        api_key=api_key,
        timeout=args.timeout,
        max_tokens=args.max_new_tokens,
        extra_body=args.extra_body,
    )


def run_refine(args: argparse.Namespace) -> int:
    """``usclip captions refine``; returns 1 when a caption failed."""
    refiner = CaptionRefiner(
        build_backend(args),
        max_tokens=args.max_tokens,
        length_retries=args.length_retries,
        retries=args.retries,
        backoff=args.backoff,
        skip_fitting_english=args.skip_fitting_english,
        counter=ClipTokenCounter(args.clip_model),
    )
    summary = refine_file(
        args.input,
        args.output,
        refiner,
        id_key=args.id_key,
        text_key=args.text_key,
        progress=False if args.quiet else None,
    )
    log.info("summary written to %s", summary_path(args.output))
    if summary.failed:
        log.warning("%d captions failed (rerun the same command to retry them): %s", summary.failed, summary.failed_ids)
    return 1 if summary.failed else 0


def main(argv: Sequence[str]) -> int:
    """Run ``usclip captions`` with ``argv`` (without the leading ``captions``); returns the exit code."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run_refine(args)
    except (FileNotFoundError, ValueError, BackendError) as err:
        print(f"usclip captions {args.command}: {err}", file=sys.stderr)
        return 2
