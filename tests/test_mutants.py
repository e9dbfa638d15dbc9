"""bench/mutants.py: every listed mutation still applies to the package, and the runner tells killed from survived."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_runner():
    spec = importlib.util.spec_from_file_location("usclip_bench_mutants", REPO / "bench" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutants = _load_runner()


def test_every_listed_mutation_applies_to_the_current_code():
    """A refactor that moves a snippet must update bench/mutants/*.yaml, or the mutation would silently vanish."""
    mutations = mutants.load_mutations()
    problems = [p for m in mutations for p in mutants.check_mutation(m)]
    assert problems == []
    names = {m.name for m in mutations}
    # the bugs issue #17 found surviving stay on the list
    assert {"lora-scale-inverted-forward", "mona-default-after-attention", "refiner-limit-off-by-one"} <= names
    assert all(m.tests for m in mutations)


def _mini_tree(root: Path) -> None:
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: long\n    realdata: real data\n")
    (root / "calc.py").write_text("def area(w, h):\n    return w * h\n\n\ndef unused():\n    return 1\n")
    (root / "tests" / "test_calc.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from calc import area

            def test_area_of_a_non_square_rectangle():
                assert area(3, 5) == 15

            @pytest.mark.slow
            def test_only_slow():
                from calc import unused
                assert unused() == 1
            """
        )
    )


def _mutation(name: str, old: str, new: str, tests: tuple[str, ...] = ("tests/test_calc.py",)):
    return mutants.Mutation(name=name, area="mini", file="calc.py", old=old, new=new, tests=tests)


def test_runner_kills_a_caught_bug_keeps_a_missed_one_and_restores_the_file(tmp_path):
    _mini_tree(tmp_path)
    before = (tmp_path / "calc.py").read_text()

    caught = mutants.run_mutation(_mutation("area-sum", "w * h", "w + h"), tmp_path, timeout=120)
    assert caught.status == "killed"
    assert caught.detail == "tests/test_calc.py::test_area_of_a_non_square_rectangle"
    # a bug that only a slow test would catch survives: the default suite is what counts
    missed = mutants.run_mutation(_mutation("unused-2", "return 1", "return 2"), tmp_path, timeout=120)
    assert missed.status == "survived"
    assert (tmp_path / "calc.py").read_text() == before


def test_check_refuses_ambiguous_missing_or_syntax_breaking_snippets(tmp_path):
    _mini_tree(tmp_path)
    (tmp_path / "calc.py").write_text("def area(w, h):\n    return w * h\n\n\ndef twice(w, h):\n    return w * h\n")
    assert mutants.check_mutation(_mutation("ambiguous", "w * h", "w + h"), tmp_path) == [
        "ambiguous: snippet occurs 2 times in calc.py, expected exactly once"
    ]
    assert mutants.check_mutation(_mutation("absent", "w / h", "w + h"), tmp_path) == [
        "absent: snippet occurs 0 times in calc.py, expected exactly once"
    ]
    broken = mutants.check_mutation(_mutation("syntax", "def area(w, h):", "def area(w, h)"), tmp_path)
    assert len(broken) == 1 and "not valid Python" in broken[0]
    no_test = mutants.check_mutation(_mutation("t", "def area", "def areas", ("tests/test_nope.py",)), tmp_path)
    assert no_test == ["t: test file tests/test_nope.py not found"]


def test_load_refuses_repeated_names_and_unknown_keys(tmp_path):
    entry = "- {name: a, file: calc.py, old: x, new: y, tests: [t.py]}\n"
    (tmp_path / "one.yaml").write_text(entry)
    (tmp_path / "two.yaml").write_text(entry)
    with pytest.raises(ValueError, match="mutation name 'a' repeated"):
        mutants.load_mutations(tmp_path)
    (tmp_path / "two.yaml").write_text("- {name: b, file: calc.py, old: x, new: y, tests: [t.py], kill: 1}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['kill'\]"):
        mutants.load_mutations(tmp_path)


def test_the_testing_guide_names_every_test_file():
    """docs/testing.md's table says what each test file covers: a new file without a row fails here."""
    guide = (REPO / "docs" / "testing.md").read_text()
    missing = [p.name for p in sorted((REPO / "tests").glob("test_*.py")) if f"`{p.name}`" not in guide]
    assert missing == []
