"""Precision that fits the machine: ``bf16`` only where the hardware computes it natively.

usclip's paper configs ask for ``precision: bf16-mixed`` (usclip's choice: the paper names no precision and the
authors' code runs fp32; right on a recent GPU). On a CPU without native bfloat16
(x86 without ``avx512_bf16``/``amx_bf16``, e.g. AVX2-only machines) PyTorch emulates it, and a training step of
ViT-B/16 runs about 50x slower than in fp32 (docs/benchmarks.md); on a GPU without bfloat16 (before Ampere)
it is emulated or refused. :func:`fit_precision` replaces such a request by what the machine does well (fp32 on
the CPU, fp16 mixed precision on an older GPU) and says why, once. ``USCLIP_KEEP_PRECISION=1`` keeps the
requested precision.

Written by hand: Lightning accepts any precision the software supports and does not look at the hardware.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["KEEP_ENV", "cpu_has_native_bf16", "fit_precision", "resolve_accelerator"]

#: environment variable that keeps a requested bf16 precision on hardware without native bf16
KEEP_ENV = "USCLIP_KEEP_PRECISION"

_BF16 = {"bf16", "bf16-mixed", "bf16-true"}
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``).

    Linux reads ``/proc/cpuinfo``; macOS asks ``sysctl hw.optional.arm.FEAT_BF16``; anything else answers
    ``False`` (the safe side: fp32 is never the slow path).
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags: set[str] = set()
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags.update(value.split())
        return bool(flags & _CPU_BF16_FLAGS) or (platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags)
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return out.stdout.strip() == "1"
    return False


def resolve_accelerator(accelerator: object) -> str:
    """``"cuda"``, ``"mps"`` or ``"cpu"`` for a Trainer's ``accelerator`` (``auto`` follows Lightning's order).

    Accelerator objects and names this module does not know resolve to ``"other"``.
    """
    name = str(accelerator).lower() if isinstance(accelerator, str) or accelerator is None else "other"
    if name in ("auto", "none"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        return "cuda"
    return name if name in ("cpu", "mps") else "other"


def fit_precision(precision: object, accelerator: object) -> tuple[object, str | None]:
    """The precision to train with on this machine, and the reason when it differs from ``precision``.

    Args:
        precision: the Trainer's ``precision`` (``"bf16-mixed"``, ``"32-true"``, ``16``, ...).
        accelerator: the Trainer's ``accelerator`` (``"auto"``, ``"cpu"``, ``"gpu"``, ...).

    Returns:
        ``(precision, None)`` when the request fits or is not bfloat16, or ``USCLIP_KEEP_PRECISION=1`` is set;
        else ``("32-true" on a CPU or "16-mixed" on a GPU, reason)``.
    """
    if str(precision) not in _BF16 or os.environ.get(KEEP_ENV, "") not in ("", "0"):
        return precision, None
    device = resolve_accelerator(accelerator)
    if device == "cpu" and not cpu_has_native_bf16():
        return "32-true", (
            f"precision={precision!r} asked for bfloat16, but this CPU has no native bfloat16 (no avx512_bf16 or "
            "amx_bf16; PyTorch would emulate it, about 50x slower than fp32 for a ViT-B/16 step): training in "
            f"32-true instead. Set {KEEP_ENV}=1 to keep {precision!r}."
        )
    if device == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name()
        return "16-mixed", (
            f"precision={precision!r} asked for bfloat16, but the GPU ({name}) has no native bfloat16 (it needs "
            f"compute capability 8.0, Ampere, or newer): training in 16-mixed instead. Set {KEEP_ENV}=1 to keep "
            f"{precision!r}."
        )
    return precision, None
