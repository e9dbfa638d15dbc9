"""The paper's configs ship in the package: found by name outside the repository, listed by `usclip configs`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from usclip.cli import main
from usclip.packaged_configs import list_configs, packaged_configs_dir, resolve_config

REPO = Path(__file__).resolve().parents[1]


def test_packaged_configs_are_the_repository_configs():
    repo = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert list_configs() == repo
    assert {"busi_seg.yaml", "demo.yaml", "baselines/clipseg.yaml", "adapters/lora_reference.yaml"} <= set(repo)


def test_resolve_config_prefers_a_local_file_then_the_package(tmp_path):
    packaged = packaged_configs_dir()
    assert resolve_config("busi_seg.yaml", tmp_path) == str(packaged / "busi_seg.yaml")
    assert resolve_config("configs/adapters/lora.yaml", tmp_path) == str(packaged / "adapters" / "lora.yaml")
    (tmp_path / "busi_seg.yaml").write_text("seed_everything: 3\n")
    assert resolve_config("busi_seg.yaml", tmp_path) == "busi_seg.yaml"  # a user's own file wins
    assert resolve_config("nope.yaml", tmp_path) == "nope.yaml"  # left for the parser to report


def test_print_config_finds_the_packaged_demo_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config", "--config", "demo.yaml"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model_name: usclip-demo-vit" in out and "name: demo" in out


def test_configs_command_lists_and_locates(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["configs"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.splitlines() == list_configs()
    with pytest.raises(SystemExit):
        main(["configs", "--path"])
    assert Path(capsys.readouterr().out.strip()) == packaged_configs_dir()


@pytest.mark.slow
def test_wheel_installed_outside_the_repository_runs_the_demo_print_config(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        timeout=600,
    )
    wheel = next(wheels.glob("usclip-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # the dependencies (torch, Lightning, ...) come from this environment; usclip only from the wheel
    deps = Path(sysconfig.get_path("purelib"))
    (site / "zz_deps.pth").write_text(f"{deps}\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = venv / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import usclip; print(usclip.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
    proc = subprocess.run(
        [python, "-m", "usclip", "fit", "--print_config", "--config", "demo.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model_name: usclip-demo-vit" in proc.stdout
    listed = subprocess.run([python, "-m", "usclip", "configs"], cwd=work, capture_output=True, text=True, timeout=120)
    assert "busi_seg.yaml" in listed.stdout.splitlines()
