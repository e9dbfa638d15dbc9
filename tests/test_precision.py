"""bf16 only where the hardware has it: usclip.precision and the CLI's use of it (capabilities faked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from usclip import precision as prec
from usclip.cli import main

CONF = Path(__file__).parent / "conf" / "segmentation_none.yaml"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(prec.KEEP_ENV, raising=False)


def test_cpu_without_native_bf16_falls_back_to_fp32(monkeypatch, no_cuda):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    for requested in ("bf16-mixed", "bf16-true", "bf16"):
        got, reason = prec.fit_precision(requested, "auto")
        assert got == "32-true"
        assert reason is not None and "no native bfloat16" in reason and requested in reason
    assert prec.fit_precision("bf16-mixed", "cpu")[0] == "32-true"
    assert prec.fit_precision("16-mixed", "cpu") == ("16-mixed", None)  # not bf16: left alone
    assert prec.fit_precision("32-true", "cpu") == ("32-true", None)


def test_cpu_with_native_bf16_keeps_it(monkeypatch, no_cuda):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.fit_precision("bf16-mixed", "auto") == ("bf16-mixed", None)


def test_keep_switch(monkeypatch, no_cuda):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv(prec.KEEP_ENV, "1")
    assert prec.fit_precision("bf16-mixed", "cpu") == ("bf16-mixed", None)
    monkeypatch.setenv(prec.KEEP_ENV, "0")
    assert prec.fit_precision("bf16-mixed", "cpu")[0] == "32-true"


def test_gpu_without_bf16_falls_back_to_fp16_mixed(monkeypatch):
    monkeypatch.delenv(prec.KEEP_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    calls = []

    def bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    got, reason = prec.fit_precision("bf16-mixed", "auto")
    assert got == "16-mixed" and "Tesla V100" in reason and "8.0" in reason
    assert calls == [False]  # emulation does not count as support
    assert prec.fit_precision("bf16-mixed", "gpu")[0] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert prec.fit_precision("bf16-mixed", "cuda") == ("bf16-mixed", None)


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    real_path = prec.Path

    def fake_path(p):
        return info if str(p) == "/proc/cpuinfo" else real_path(p)

    monkeypatch.setattr(prec, "Path", fake_path)
    monkeypatch.setattr(prec.platform, "machine", lambda: "x86_64")
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        prec.cpu_has_native_bf16.cache_clear()
        assert prec.cpu_has_native_bf16() is expected, flags
    prec.cpu_has_native_bf16.cache_clear()


def test_cli_applies_the_fallback_with_one_warning(monkeypatch, no_cuda, tmp_path):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    args = ["--config", str(CONF), f"--data.init_args.root={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.warns(UserWarning, match="no native bfloat16") as record:
        cli = main([*args, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu"], run=False)
    assert sum("no native bfloat16" in str(w.message) for w in record) == 1
    assert cli.trainer.precision == "32-true"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    cli = main([*args, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu"], run=False)
    assert cli.trainer.precision == "bf16-mixed"
