"""Declared dependencies match the code: pyproject.toml against the imports of usclip/ (read with ast).

* Every third-party module usclip imports is a core dependency, or an optional one imported lazily (inside a
  function or under ``TYPE_CHECKING``) whose error names the extra that installs it (``pip install 'usclip[x]'``).
* Every core dependency is imported somewhere, or is on the short list of runtime-only ones with the reason.
* ``ci/lowest-constraints.txt`` (CI's lowest-versions job) pins exactly the declared floors.
* albumentations stays within its MIT-licensed releases (2.0.8 is the last; "albumentationsx" is AGPL).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "ci" / "lowest-constraints.txt"

#: import name -> distribution, where the two differ beyond "-" vs "_"
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "yaml": "pyyaml",
    "open_clip": "open-clip-torch",
}

#: core dependencies usclip needs at run time without importing them itself
RUNTIME_ONLY = {
    "jsonargparse": "LightningCLI's parser (usclip fit/test/predict); [signatures] reads the classes' docstrings",
    "tensorboard": "the TensorBoardLogger of every packaged config (lightning's logger imports it)",
}


def _requirements(items: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in items]
    return {canonicalize_name(r.name): r for r in reqs}


CORE = _requirements(PYPROJECT["dependencies"])
EXTRAS = {name: _requirements(items) for name, items in PYPROJECT["optional-dependencies"].items()}


def _floor(req: Requirement) -> Version:
    """The lowest version a requirement allows: ``>=x`` or ``==x`` / ``==x.*``."""
    floors = [Version(s.version.removesuffix(".*")) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert len(floors) == 1, f"{req}: expected one lower bound (>=, == or ~=), got {req.specifier}"
    return floors[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """``(top-level module, at module level)`` of every absolute import; ``TYPE_CHECKING`` blocks count as lazy."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(child, ast.If) and _is_type_checking(child.test)
            ):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return found


def _third_party_imports() -> dict[str, list[tuple[Path, bool]]]:
    """Distribution name -> the files that import it (and whether at module level)."""
    uses: dict[str, list[tuple[Path, bool]]] = {}
    for path in sorted((ROOT / "usclip").rglob("*.py")):
        for module, top in _imports(ast.parse(path.read_text(), str(path))):
            if module in sys.stdlib_module_names or module == "usclip":
                continue
            dist = canonicalize_name(DISTRIBUTION_OF.get(module, module))
            uses.setdefault(dist, []).append((path, top))
    return uses


USES = _third_party_imports()


def test_every_imported_package_is_core_or_a_lazy_import_whose_error_names_its_extra():
    from usclip.models.baselines import MODEL_EXTRAS

    guarded = {(canonicalize_name(DISTRIBUTION_OF.get(m, m)), extra) for m, extra in MODEL_EXTRAS.values()}
    for dist, sites in USES.items():
        if dist in CORE:
            continue
        extras = sorted(name for name, reqs in EXTRAS.items() if dist in reqs and name != "dev")
        assert extras, f"usclip imports {dist} ({sites[0][0].relative_to(ROOT)}), which no extra but dev declares"
        for path, top in sites:
            where = path.relative_to(ROOT)
            assert not top, f"{where} imports the optional {dist} at module level: `import usclip` would need it"
            text = path.read_text()
            named = [e for e in extras if f"usclip[{e}]" in text or (dist, e) in guarded]
            assert named, f"{where} imports {dist} without an error naming pip install 'usclip[{extras[0]}]'"


def test_every_core_dependency_is_used():
    assert set(RUNTIME_ONLY) <= set(CORE)
    unused = sorted(set(CORE) - set(USES) - set(RUNTIME_ONLY))
    assert not unused, f"declared in pyproject.toml but never imported by usclip: {unused}"
    assert "scipy" not in CORE and "segmentation-models-pytorch" not in CORE
    # the runtime-only ones are used: every packaged task config logs to TensorBoard through LightningCLI
    assert "lightning.pytorch.loggers.TensorBoardLogger" in (ROOT / "configs" / "busi_seg.yaml").read_text()


def test_every_extra_is_named_by_the_error_of_what_needs_it():
    from usclip.models.baselines import MODEL_EXTRAS
    from usclip.run_dirs import LOGGER_EXTRAS

    source = "\n".join(p.read_text() for p in (ROOT / "usclip").rglob("*.py"))
    named = {e for e in EXTRAS if f"usclip[{e}]" in source} | {e for _, e in MODEL_EXTRAS.values()}
    assert set(EXTRAS) - {"dev"} <= named | set(LOGGER_EXTRAS.values())
    assert set(LOGGER_EXTRAS.values()) <= set(EXTRAS)
    assert {e for _, e in MODEL_EXTRAS.values()} <= set(EXTRAS)
    # the dev environment runs the tests of every extra but the loggers
    dev = set(EXTRAS["dev"])
    for name, reqs in EXTRAS.items():
        if name not in ("dev", "mlflow", "wandb"):
            assert set(reqs) <= dev, f"the {name} extra's {sorted(set(reqs) - dev)} missing from dev"


def test_lowest_constraints_pin_exactly_the_declared_floors():
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and "[" not in name, f"{CONSTRAINTS.name}: expected name==version, got {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    assert set(pins) == set(CORE)
    wrong = {n: (str(pins[n]), str(_floor(r))) for n, r in CORE.items() if pins[n] != _floor(r)}
    assert not wrong, f"{CONSTRAINTS.name} pins (pinned, declared floor): {wrong}"
    assert all(pins[n] in r.specifier for n, r in CORE.items())
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci/lowest-constraints.txt" in ci and "-n 2" in ci


def test_albumentations_stays_within_the_mit_releases_the_code_needs():
    spec = CORE["albumentations"].specifier
    assert spec == SpecifierSet(">=2.0.3,<=2.0.8")
    # 2.0.3 added AutoContrast(method="pil") (configs/augment/reference.yaml); 2.0.8 is the last MIT release
    assert [v for v in ("2.0.2", "2.0.3", "2.0.8", "2.0.9", "2.1.0") if spec.contains(v)] == ["2.0.3", "2.0.8"]
    installed = importlib.metadata.metadata("albumentations")
    assert installed["Version"] in spec
    assert "MIT" in (installed["License"] or "") + " ".join(installed.get_all("Classifier") or [])

    from usclip.data.transforms import build_augmentations

    # albumentations before 2.0.3 only warns about the unknown argument, which build_augmentations refuses
    (built,) = build_augmentations({"AutoContrast": {"method": "pil", "p": 1.0}})
    assert built.method == "pil"


def test_smp_without_its_extra_is_one_line_naming_it(monkeypatch):
    from usclip.models.baselines import build_native_model, check_model_installed

    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'usclip[baselines]'")) as err:
        build_native_model("segmentation", "smp:Unet/resnet18", 2, None, 64)
    assert "model_name='smp:Unet/resnet18'" in str(err.value) and "\n" not in str(err.value)
    check_model_installed("ViT-B-16")  # CLIP models need nothing more
    check_model_installed(None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'usclip[clipseg]'")):
        check_model_installed("clipseg:CIDAS/clipseg-rd64-refined")


def test_cli_refuses_a_baseline_config_without_its_extra_before_building(monkeypatch, tmp_path, capsys):
    from usclip.cli import main

    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "tests" / "conf" / "segmentation_unet.yaml"),
                f"--data.init_args.root={tmp_path / 'data'}",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert exc.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("usclip: error: ") and "pip install 'usclip[baselines]'" in first
    assert not (tmp_path / "data").exists()  # refused before the synthetic data was written
