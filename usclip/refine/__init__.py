"""Caption refinement with an LLM: translate into English and shorten to fit CLIP's 77 tokens (``usclip captions``).

See docs/captions_refine.md.
"""

from usclip.refine.backends import Backend, BackendError, OpenAICompatibleBackend, TransformersBackend
from usclip.refine.refiner import STATUSES, CaptionRefiner, Refined, RefineSummary, refine_file, summary_path
from usclip.refine.tokens import CLIP_CONTEXT_LENGTH, ClipTokenCounter, cut_to_fit

__all__ = [
    "CLIP_CONTEXT_LENGTH",
    "STATUSES",
    "Backend",
    "BackendError",
    "CaptionRefiner",
    "ClipTokenCounter",
    "OpenAICompatibleBackend",
    "RefineSummary",
    "Refined",
    "TransformersBackend",
    "cut_to_fit",
    "refine_file",
    "summary_path",
]
