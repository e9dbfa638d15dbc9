"""``usclip sweep`` and the paper manifest: cells of Tables 2 and 3, commands, selection, SLURM scripts, local runs.

The end-to-end tests run a reduced manifest (tests/conf/manifests/sweep_tiny.yaml: 2 synthetic datasets x 3 methods x
2 seeds, a tiny caption run behind the "ft." row, an external test set) through the real ``usclip sweep``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from usclip.cli import UsclipCLI, main
from usclip.commands.report import main as main_report
from usclip.commands.sweep import chosen_protocols
from usclip.data import ZeroShotDataModule
from usclip.data.datamodules import BaseDataModule
from usclip.data.synthetic import write_synthetic_dataset
from usclip.reporting import aggregate, find_run_dirs, load_run
from usclip.reproduce import (
    ManifestError,
    SweepPlan,
    build_commands,
    default_protocol,
    dry_run_lines,
    expand_runs,
    load_datasets,
    load_manifest,
    missing_configs,
    protocol_names,
    run_sweep,
    select_runs,
    slugify,
)
from usclip.tasks.base import BaseTask

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "conf" / "manifests" / "sweep_tiny.yaml"
# config files the contract says other engineers add in this round (absent on this branch until the merge): the
# authors protocol's heads, adapters, baselines, training loops and zero-shot input (issue #22)
PROTOCOLS = ("authors", "usclip")


def _paper_cells() -> set[tuple[str, str, str, str]]:
    from usclip.paper import published

    return {(r.table, r.task, r.method, r.dataset) for r in published()}


def _fake_datasets(tmp_path: Path, runs) -> dict[str, str]:
    return {name: str(tmp_path / name) for name in {n for r in runs for n in r.needs}}


# --------------------------------------------------------------------------------------------- the paper manifest
def _seg_or_cls(group: str) -> str:
    return "segmentation" if group == "segmentation" else "classification"


def _expected_configs(protocol: str, group: str, method: str, dataset: str) -> list[str]:
    """The configs of a paper cell, written out independently of paper.yaml (issue #22, section 3)."""
    if group == "zero-shot":
        base = [f"configs/vision_language/zeroshot_{dataset.lower().replace('-', '')}.yaml"]
        return base + (
            ["configs/vision_language/zeroshot_authors.yaml", "configs/metrics/authors.yaml"]
            if protocol == "authors"
            else []
        )
    task = {"segmentation": "seg", "supervised": "cls"}[group]
    data = "configs/ln2_test.yaml" if (dataset, group) == ("LN-2", "segmentation") else None
    data = data or f"configs/{'ln1' if dataset == 'LN-2' else dataset.lower().replace('-', '')}_{task}.yaml"
    if protocol == "usclip":
        usclip = {
            "UNet": ["configs/baselines/unet.yaml"],
            "ResNet18": ["configs/baselines/resnet18.yaml"],
            "CLIPSeg": ["configs/baselines/clipseg.yaml"],
            "DINOv2": ["configs/baselines/dinov2.yaml"],
            "CLIP (Mona)": ["configs/adapters/mona.yaml"],
            "CLIP (Mona, ft.)": ["configs/adapters/mona.yaml"],
            "CLIP (LoRA)": ["configs/adapters/lora_reference.yaml"],
            "CLIP (LoRA, ft.)": ["configs/adapters/lora_reference.yaml"],
        }
        medical = [f"configs/baselines/{method.lower()}.yaml", "configs/adapters/none.yaml"]
        return [data, *usclip.get(method, medical)]
    kind = _seg_or_cls(group)
    release, later = f"configs/training/authors_{kind}.yaml", f"configs/training/authors_src_{kind}.yaml"
    authors = {
        "UNet": ["configs/baselines/unet_authors.yaml", later],
        "ResNet18": ["configs/baselines/resnet18_authors.yaml", later],
        "CLIPSeg": ["configs/baselines/clipseg.yaml", later],
        "DINOv2": ["configs/baselines/dinov2_authors.yaml", later],
        "CLIP (LoRA)": ["configs/adapters/lora_authors.yaml", "configs/heads/authors_src.yaml", later],
        "CLIP (LoRA, ft.)": ["configs/adapters/lora_ft_authors.yaml", "configs/heads/authors_src.yaml", later],
    }
    mona = ["configs/adapters/mona_released.yaml", "configs/heads/authors_release.yaml", release]
    medical = [f"configs/baselines/{method.lower()}.yaml", "configs/adapters/none.yaml"]
    medical += ["configs/heads/authors_timm.yaml", later]
    overlays = ["configs/augment/reference.yaml", "configs/metrics/authors.yaml"]
    return [data, *overlays, *authors.get(method, mona if "Mona" in method else medical)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_paper_manifest_has_every_cell_of_tables_2_and_3_with_its_configs(protocol):
    runs = expand_runs(load_manifest("paper"), protocol=protocol)
    assert {r.protocol for r in runs} == {protocol} and all(r.key.startswith(f"{protocol}/") for r in runs)
    cells = [r for r in runs if r.table is not None]
    found: dict[tuple[str, str, str, str], list[int]] = {}
    for run in cells:
        found.setdefault((run.table, run.group, run.method, run.dataset), []).append(run.seed)
        assert run.configs == _expected_configs(protocol, run.group, run.method, run.dataset), run.key
    assert set(found) == _paper_cells()  # 102 cells: 10 x 6 + 5 x 3 + 9 x 3
    assert len(found) == 102
    for (_, group, method, _), seeds in found.items():
        # zero-shot trains nothing: once, unless it loads the adapters of a caption run (one per seed)
        tuned = "ft." in method and not (protocol == "authors" and "Mona" in method)
        assert sorted(seeds) == ([1] if group == "zero-shot" and not tuned else [1, 2, 3]), (group, method)
    assert len(cells) == {"authors": 282, "usclip": 288}[protocol]
    # reference rows, external tests, ft. dependencies
    assert {r.method for r in cells if r.reference} == {"UNet", "ResNet18"}
    for run in cells:
        if run.dataset == "LN-2" and run.group != "zero-shot":
            assert run.subcommands == ["test"]
            assert run.ckpt_from == f"{protocol}/{run.table}/LN-1/{run.slug}/seed_{run.seed}"
        if "ft." in run.method and run.adapter_from is not None:
            kind = "mona" if "Mona" in run.method else "lora"
            assert run.adapter_from == f"{protocol}/captions/clip_{kind}/seed_{run.seed}"
        if run.group == "zero-shot":
            assert run.subcommands == ["test"] and run.slug.startswith("zeroshot_")
    ft_without_adapters = {(r.group, r.method) for r in cells if "ft." in r.method and r.adapter_from is None}
    # the release's zero-shot script loaded the tuned Mona state dict into a CLIP without Mona modules
    assert ft_without_adapters == ({("zero-shot", "CLIP (Mona, ft.)")} if protocol == "authors" else set())
    captions = {r.method: r.configs for r in runs if r.table is None}
    mona, lora = ("mona_released", "lora_reference") if protocol == "authors" else ("mona", "lora_reference")
    for configs in captions.values():  # caption tuning trains its adapters: it refuses train_adapter: false
        for config in configs:
            init = (yaml.safe_load((REPO / config).read_text()).get("model") or {}).get("init_args") or {}
            assert init.get("train_adapter", True), f"{config} freezes the adapter that caption tuning trains"
    assert captions == {
        "CLIP (Mona) caption fine-tuning": ["configs/captions_pmcoa_curd.yaml", f"configs/adapters/{mona}.yaml"],
        "CLIP (LoRA) caption fine-tuning": ["configs/captions_pmcoa_curd.yaml", f"configs/adapters/{lora}.yaml"],
    }
    assert len({r.key for r in runs}) == len(runs)


def test_paper_manifest_runs_authors_by_default_and_both_protocols_in_separate_folders():
    manifest = load_manifest("paper")
    assert protocol_names(manifest) == ["authors", "usclip"] and default_protocol(manifest) == "authors"
    assert [r.key for r in expand_runs(manifest)] == [r.key for r in expand_runs(manifest, protocol="authors")]
    both = [r for p in chosen_protocols(manifest, "both") for r in expand_runs(manifest, [1], p)]
    assert len({r.key for r in both}) == len(both)
    assert {r.key.split("/")[0] for r in both} == {"authors", "usclip"}
    assert chosen_protocols(manifest, None) == ["authors"] and chosen_protocols(manifest, "all") == list(PROTOCOLS)
    with pytest.raises(ManifestError, match=r"protocol 'paper' is not one of .*\['authors', 'usclip'\]"):
        expand_runs(manifest, protocol="paper")


def test_paper_manifest_zero_shot_and_baseline_choices():
    runs = {(r.group, r.method, r.dataset): r for r in expand_runs(load_manifest("paper"), [1], "usclip")}
    vanilla = runs[("zero-shot", "CLIP (vanilla)", "LN-1")]
    # untrained adapters are vanilla CLIP; the whole dataset is scored (the paper's protocol)
    for method in ("CLIP (LoRA)", "CLIP (Mona)"):
        assert runs[("zero-shot", method, "LN-1")].configs == vanilla.configs
        assert runs[("zero-shot", method, "LN-1")].args == vanilla.args
    assert vanilla.args["--data.init_args.score_on"] == "all"
    assert runs[("zero-shot", "CLIP (Mona, ft.)", "BUSI")].adapter_from == "usclip/captions/clip_mona/seed_1"
    # medical CLIPs: frozen encoder + head, no adapter
    for method in ("BioMedCLIP", "UniMedCLIP", "MetaCLIP"):
        assert runs[("segmentation", method, "BUSI")].configs[-1] == "configs/adapters/none.yaml"
    assert runs[("supervised", "UniMedCLIP", "LN-1")].needs == ["LN-1", "UniMedCLIP"]
    # CLIPSeg trains with the authors' prompt of its dataset; no other method gets a prompt
    for protocol in PROTOCOLS:
        runs = {(r.group, r.method, r.dataset): r for r in expand_runs(load_manifest("paper"), [1], protocol)}
        for dataset, prompt in (
            ("LN-1", "ln1"),
            ("BUSI", "busi"),
            ("DDTI", "ddti"),
            ("TN3K", "tn3k"),
            ("Prostate", "prostate"),
        ):
            assert runs[("segmentation", "CLIPSeg", dataset)].args["--model.init_args.text_prompt"] == prompt
        assert "--model.init_args.text_prompt" not in runs[("segmentation", "CLIPSeg", "LN-2")].args
        assert not any("--model.init_args.text_prompt" in r.args for k, r in runs.items() if k[1] != "CLIPSeg")
        assert runs[("supervised", "UniMedCLIP", "BUSI")].args["--model.init_args.pretrained"] == "${UniMedCLIP}"
        # zero-shot CLIP (Mona, ft.): the tuned adapters (usclip) or, as the paper measured it, vanilla CLIP (authors)
        ft = runs[("zero-shot", "CLIP (Mona, ft.)", "BUSI")]
        assert (ft.adapter_from is None) == (protocol == "authors") == ("vanilla CLIP" in ft.note)


def test_paper_dry_run_composes_every_cell_of_both_protocols(tmp_path, capsys):
    manifest = load_manifest("paper")
    runs = {r.key: r for p in PROTOCOLS for r in expand_runs(manifest, protocol=p)}
    missing = sorted({c for r in runs.values() for c in r.configs if not (REPO / c).is_file()})
    assert not missing, f"config files the paper manifest names do not exist: {missing}"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "paper", "--protocol", "both", "--dry-run", "--runs-root", str(tmp_path / "runs")])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# usclip sweep paper (protocol authors, usclip): 582 runs")
    commands: dict[str, list[list[str]]] = {}
    key = ""
    for line in lines:
        if line.startswith("# ") and ": " in line and "/seed_" in line.split(":")[0]:
            key = line[2:].split(":")[0]
            commands[key] = []
        elif line.startswith("usclip "):
            commands[key].append(shlex.split(line))
    assert set(commands) == set(runs)
    for key, cmds in commands.items():
        run = runs[key]
        assert [c[1] for c in cmds] == run.subcommands, key
        for cmd in cmds:
            assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"] == run.configs, key
            save_dir = tmp_path / "runs" / run.protocol / (f"{run.table}/{run.dataset}" if run.table else "captions")
            assert cmd[cmd.index("--trainer.logger.init_args.save_dir") + 1] == str(save_dir)


# protocols on a small manifest: group overlays, per-protocol replacement, the composition order, deterministic rows
PROTOCOL_MANIFEST = {
    "seeds": [1, 2],
    "default_protocol": "theirs",
    "protocols": {
        "theirs": {"groups": {"segmentation": {"configs": ["g.yaml"], "args": {"--g": 1}}}},
        "ours": {"description": "as shipped"},
    },
    "prerequisites": {"tune": {"configs": ["tune.yaml"], "protocols": {"theirs": {"configs": ["tune_theirs.yaml"]}}}},
    "tables": [
        {"table": "table2", "group": "segmentation",
         "datasets": {"A": {"configs": ["a.yaml"], "args": {"--a": 1}}, "B": {"external_test_of": "A"}},
         "methods": {
             "M": {"configs": ["m.yaml"], "args": {"--m": 1, "--g": 2},
                   "protocols": {"theirs": {"configs": ["m_theirs.yaml"], "seeds": [3]}}},
             "M ft.": {"configs": ["m.yaml"], "adapter_from": "tune"}}},
        {"table": "table3", "group": "zero-shot", "deterministic": True, "datasets": {"A": {"configs": ["z.yaml"]}},
         "methods": {"Z": {}, "Z ft.": {"adapter_from": "tune", "protocols": {"theirs": {"adapter_from": None}}}}},
    ],
}  # fmt: skip


def _write(tmp_path: Path, data: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_protocols_compose_group_overlays_then_method_configs_and_replace_per_protocol(tmp_path):
    manifest = load_manifest(_write(tmp_path, PROTOCOL_MANIFEST))
    theirs = {r.key: r for r in expand_runs(manifest)}  # the default protocol
    ours = {r.key: r for r in expand_runs(manifest, protocol="ours")}
    assert sorted(theirs) == [
        "theirs/prerequisites/tune/seed_1", "theirs/prerequisites/tune/seed_2",
        "theirs/table2/A/m/seed_3", "theirs/table2/A/m_ft/seed_1", "theirs/table2/A/m_ft/seed_2",
        "theirs/table2/B/m/seed_3", "theirs/table2/B/m_ft/seed_1", "theirs/table2/B/m_ft/seed_2",
        "theirs/table3/A/z/seed_1", "theirs/table3/A/z_ft/seed_1",
    ]  # fmt: skip
    # dataset configs, then the protocol's group overlays, then the method's (replaced under "theirs")
    m = theirs["theirs/table2/A/m/seed_3"]
    assert m.configs == ["a.yaml", "g.yaml", "m_theirs.yaml"]
    assert m.args == {"--a": "1", "--g": "2", "--m": "1"} and list(m.args) == ["--a", "--g", "--m"]
    assert theirs["theirs/table2/B/m/seed_3"].ckpt_from == "theirs/table2/A/m/seed_3"
    assert theirs["theirs/table2/A/m_ft/seed_2"].adapter_from == "theirs/prerequisites/tune/seed_2"
    assert theirs["theirs/prerequisites/tune/seed_1"].configs == ["tune_theirs.yaml"]
    assert ours["ours/table2/A/m/seed_1"].configs == ["a.yaml", "m.yaml"]  # no overlays
    assert ours["ours/prerequisites/tune/seed_1"].configs == ["tune.yaml"]
    # deterministic: once at the first seed; a row with tuned adapters once per seed (its input differs)
    assert [k for k in ours if "table3" in k] == ["ours/table3/A/z/seed_1", "ours/table3/A/z_ft/seed_1",
                                                  "ours/table3/A/z_ft/seed_2"]  # fmt: skip
    assert theirs["theirs/table3/A/z_ft/seed_1"].depends == []  # adapter_from replaced by null
    # --seeds replaces the manifest's and the methods' seeds; the deterministic group runs at the first one
    keys = {r.key for r in expand_runs(manifest, [5, 6])}
    assert "theirs/table2/A/m/seed_5" in keys and "theirs/table3/A/z/seed_5" in keys
    assert "theirs/table3/A/z/seed_6" not in keys and not any(k.endswith("seed_3") for k in keys)


def test_manifests_without_protocols_keep_their_folders_and_refuse_a_protocol(tmp_path):
    manifest = load_manifest(TINY)
    assert protocol_names(manifest) == [] and default_protocol(manifest) is None
    assert all(r.protocol is None and r.key.startswith(("table2/", "captions/")) for r in expand_runs(manifest))
    with pytest.raises(ManifestError, match=r"declares no protocols; drop --protocol authors"):
        expand_runs(manifest, protocol="authors")
    with pytest.raises(ManifestError, match=r"--protocol both: .* declares 0 protocols"):
        chosen_protocols(manifest, "both")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(default_protocol="mine"), r"default_protocol='mine' is not one of the protocols"),
        (lambda m: m["protocols"].update(all={}), r"protocols\.all: 'all' is reserved"),
        (lambda m: m["protocols"]["ours"].update(groups={"supervised": {}}), r"'supervised' is not a row group"),
        (lambda m: m["protocols"]["ours"].update(groups={"segmentation": {"seeds": [1]}}), r"unknown keys \['seeds'\]"),
        (lambda m: m["tables"][0]["methods"]["M"]["protocols"].update(mine={}), r"'mine' is not a protocol"),
        (lambda m: m["tables"][0]["methods"]["M"]["protocols"]["theirs"].update(slug="x"), r"unknown keys \['slug'\]"),
        (lambda m: m["tables"][0]["methods"]["M ft."].update(seeds="1"), r"seeds must be a non-empty list of integers"),
        (lambda m: m["tables"][1].update(deterministic="yes"), r"deterministic must be true or false, got 'yes'"),
        (lambda m: m.pop("default_protocol"), r"no default_protocol; choose one of \['theirs', 'ours'\]"),
    ],
)
def test_protocol_errors_name_the_entry(tmp_path, change, message):
    data = copy.deepcopy(PROTOCOL_MANIFEST)
    change(data)
    with pytest.raises(ManifestError, match=message):
        expand_runs(load_manifest(_write(tmp_path, data)))


def _grab_parser():
    class Grabbed(Exception):
        pass

    class ParseOnly(UsclipCLI):
        def parse_arguments(self, parser, args) -> None:
            raise Grabbed(parser)

    try:
        ParseOnly(BaseTask, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True, args=["fit"])
    except Grabbed as grabbed:
        return grabbed.args[0]
    raise AssertionError("the parser was not built")


def _resolve_all(tmp_path: Path, exhaustive: bool) -> tuple[int, set[str]]:
    """Parse the configuration of the paper manifest's commands (both protocols); returns (parsed, missing files)."""
    runs = [r for p in PROTOCOLS for r in expand_runs(load_manifest("paper"), [1], p)]
    plan = SweepPlan(tmp_path / "runs", _fake_datasets(tmp_path, runs), REPO)
    missing = {c for r in runs for c in missing_configs(r, plan)}
    combos: dict[tuple, list[str]] = {}
    covered: set[str] = set()
    # fast: every config file, option and row group of the usclip protocol; of the authors protocol the longest
    # composition of each row group (its group overlays with a method's; each config file is resolved by the test
    # of the part that ships it)
    longest: dict[str | None, int] = {}
    for run in sorted(runs, key=lambda r: (r.protocol != "usclip", -len(r.configs))):
        if missing_configs(run, plan):
            continue
        # the parser sees the first command of a run (fit, or test for test-only runs): its configs and args
        argv = build_commands(run, plan)[0][1:]
        key = (argv[0], tuple(run.configs), tuple(sorted(run.args)))
        new = set(run.configs) | set(run.args) | {run.group or ""}
        if run.protocol == "authors" and not exhaustive:
            new = set() if run.group in longest else {f"authors {run.group}"}
            longest[run.group] = len(run.configs)
        if exhaustive or not new <= covered:
            combos.setdefault(key, argv)
            covered |= new
    parser = _grab_parser()
    for argv in combos.values():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                cfg = parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"does not resolve: usclip {shlex.join(argv)}\n{err.getvalue()[-2000:]}") from None
        sub = cfg[argv[0]]
        assert sub.trainer.logger.init_args.version.startswith("seed_")
        assert sub.model.init_args.image_size == sub.data.init_args.image_size  # the link applied
    return len(combos), missing


def test_paper_manifest_commands_resolve(tmp_path):
    # one command per distinct config file, option and row group (the exhaustive twin below is slow)
    parsed, missing = _resolve_all(tmp_path, exhaustive=False)
    assert parsed >= 10
    assert not missing, f"config files the paper manifest names do not exist: {sorted(missing)}"


@pytest.mark.slow
def test_paper_manifest_every_command_resolves(tmp_path):
    parsed, missing = _resolve_all(tmp_path, exhaustive=True)
    assert parsed >= 50
    assert not missing


# --------------------------------------------------------------------------------------- manifest and selection
def test_slugify_and_run_folders():
    assert slugify("CLIP (Mona, ft.)") == "clip_mona_ft"
    runs = {r.key: r for r in expand_runs(load_manifest(TINY))}
    assert sorted(runs) == sorted(
        [f"captions/clip_mona/seed_{s}" for s in (1, 2)]
        + [f"table2/{d}/{m}/seed_{s}" for d in "AB" for m in ("clip_mona", "clip_lora", "clip_mona_ft") for s in (1, 2)]
    )
    ext = runs["table2/B/clip_mona_ft/seed_2"]
    assert ext.depends == ["captions/clip_mona/seed_2", "table2/A/clip_mona_ft/seed_2"]
    assert ext.needs == ["B"]


def test_only_filters_by_kind_and_keeps_dependencies():
    runs = expand_runs(load_manifest(TINY))
    chosen, deps = select_runs(runs, ["B", "CLIP (Mona, ft.)"])
    assert [r.key for r in chosen] == ["table2/B/clip_mona_ft/seed_1", "table2/B/clip_mona_ft/seed_2"]
    assert {r.key for r in deps} == {
        "captions/clip_mona/seed_1",
        "captions/clip_mona/seed_2",
        "table2/A/clip_mona_ft/seed_1",
        "table2/A/clip_mona_ft/seed_2",
    }
    # same kind: alternatives; slugs work as method names
    chosen, deps = select_runs(runs, ["clip_lora", "clip_mona"])
    assert {r.slug for r in chosen} == {"clip_lora", "clip_mona"} and len(chosen) == 8 and not deps
    with pytest.raises(ManifestError, match=r"'LN-3' matches no table.*valid:.*'A'"):
        select_runs(runs, ["LN-3"])


def test_manifest_errors_name_the_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tables": [{"table": "table2", "group": "segmentation", "methods": {"M": {
        "adapter_from": "captions"}}, "datasets": {"A": {}}}]}))  # fmt: skip
    with pytest.raises(ManifestError, match=r"methods\['M'\]: adapter_from='captions' is not a prerequisite"):
        expand_runs(load_manifest(bad))
    bad.write_text(yaml.safe_dump({"tables": [{"table": "table4", "group": "x"}]}))
    with pytest.raises(ManifestError, match=r"table2 or table3.*'table4'"):
        expand_runs(load_manifest(bad))
    with pytest.raises(FileNotFoundError, match=r"'nope\.yaml' does not exist"):
        load_manifest("nope.yaml")
    datasets = tmp_path / "datasets.yaml"
    datasets.write_text("A: data/a\n")
    assert load_datasets(datasets) == {"A": str(tmp_path / "data" / "a")}  # relative to the file
    plan = SweepPlan(tmp_path / "runs", load_datasets(datasets), REPO)
    run = next(r for r in expand_runs(load_manifest(TINY)) if r.dataset == "B")
    with pytest.raises(ManifestError, match=r"needs dataset 'B'.*add a line 'B: /path/to/folder'"):
        build_commands(run, plan)


def test_sweep_records_the_protocol_for_the_report_and_slurm_tasks_keep_it(tmp_path, monkeypatch, capsys):
    # the sweep -> report contract without training: the usclip commands are replaced by a stand-in that writes
    # the results file `usclip test` would write
    import usclip.reproduce.sweep as sweep_module

    path = _write(tmp_path, PROTOCOL_MANIFEST, "manifest.yaml")
    for name in ("g", "a", "m", "m_theirs", "tune", "tune_theirs", "z"):  # the config files it names
        (tmp_path / f"{name}.yaml").write_text("{}\n")

    def fake_usclip(argv, log_file, cwd, device=None):
        if argv[0] == "test":
            out = Path(argv[argv.index("--trainer.logger.init_args.save_dir") + 1])
            run_dir = out / argv[argv.index("--trainer.logger.init_args.name") + 1] / "seed_1"
            (run_dir / "results").mkdir(parents=True, exist_ok=True)
            (run_dir / "results" / "test_metrics.json").write_text(json.dumps({"acc": 0.5, "auc": 0.5}))
        return 0

    monkeypatch.setattr(sweep_module, "_run_subprocess", fake_usclip)
    common = [str(path), "--runs-root", str(tmp_path / "runs"), "--config-root", str(tmp_path), "--seeds", "1"]
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *common, "--protocol", "all", "--only", "table3"])
    assert exit_.value.code == 0
    for protocol, deterministic in (("theirs", True), ("ours", False)):
        run_dir = tmp_path / "runs" / protocol / "table3" / "A" / "z_ft" / "seed_1"
        info = json.loads((run_dir / "sweep_run.json").read_text())
        assert (info["protocol"], info["deterministic"]) == (protocol, deterministic)
        result = load_run(run_dir)
        assert (result.sweep_protocol, result.deterministic, result.method) == (protocol, deterministic, "Z ft.")
    out = tmp_path / "slurm"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *common, "--protocol", "both", "--launcher", "slurm", "--slurm-out", str(out)])
    assert exit_.value.code == 0
    level0 = (out / "level_0.sbatch").read_text()
    assert '--protocol both --run "${RUNS[$SLURM_ARRAY_TASK_ID]}"' in level0
    assert "  theirs/table3/A/z/seed_1  #" in level0 and "  ours/table3/A/z/seed_1  #" in level0


# ---------------------------------------------------------------------------------------------------- dry run
def _datasets_file(tmp_path: Path) -> Path:
    path = tmp_path / "datasets.yaml"
    path.write_text(f"A: {tmp_path / 'A'}\nB: {tmp_path / 'B'}\n")
    return path


def test_dry_run_prints_runnable_commands_in_dependency_order(tmp_path, capsys):
    args = ["sweep", str(TINY), "--datasets", str(_datasets_file(tmp_path)), "--runs-root", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--dry-run", "--config-root", str(REPO)])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if line.startswith("usclip ")]
    assert len(commands) == 2 + 6 * 2 + 6  # captions fit; A: fit + test; B: test
    heads = [line[2:].split(":")[0] for line in lines if line.startswith(("# table", "# captions"))]
    assert heads.index("captions/clip_mona/seed_1") < heads.index("table2/A/clip_mona_ft/seed_1")
    assert heads.index("table2/A/clip_mona_ft/seed_1") < heads.index("table2/B/clip_mona_ft/seed_1")
    ext = next(c for c in commands if f"{tmp_path / 'B'}" in c and "clip_mona_ft" in c)
    run_a = tmp_path / "runs" / "table2" / "A" / "clip_mona_ft" / "seed_1"
    assert ext[:2] == ["usclip", "test"]
    assert ext[ext.index("--ckpt_path") + 1] == str(run_a / "checkpoints" / "best.ckpt")
    captions = tmp_path / "runs" / "captions" / "clip_mona" / "seed_1" / "adapters" / "best.safetensors"
    assert ext[ext.index("--model.init_args.adapter_checkpoint") + 1] == str(captions)
    assert ext[ext.index("--trainer.logger.init_args.version") + 1] == "seed_1"
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_missing_config_is_listed_and_its_dependents_blocked(tmp_path):
    manifest = yaml.safe_load(TINY.read_text())
    manifest["prerequisites"]["captions_mona"]["configs"] = ["configs/not_yet.yaml"]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    runs = expand_runs(load_manifest(path), [1])
    plan = SweepPlan(tmp_path / "runs", {"A": str(tmp_path / "A"), "B": str(tmp_path / "B")}, REPO)
    lines = dry_run_lines(runs, plan)
    assert "# captions/clip_mona/seed_1: tiny caption fine-tuning | A | seed 1 [missing: configs/not_yet.yaml]" in lines
    assert any(line.startswith("# table2/B/clip_mona_ft/seed_1") and "blocked" in line for line in lines)
    selected, deps = select_runs(runs, ["clip_mona_ft"])
    outcome = run_sweep(deps + selected, plan, echo=lambda s: None)
    assert outcome["missing"] == ["captions/clip_mona/seed_1"]
    assert outcome["blocked"] == ["table2/A/clip_mona_ft/seed_1", "table2/B/clip_mona_ft/seed_1"]
    assert not outcome["ran"]


def test_slurm_scripts_chain_job_arrays_with_afterok(tmp_path, capsys):
    datasets = _datasets_file(tmp_path)
    out = tmp_path / "slurm"
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(TINY), "--datasets", str(datasets), "--runs-root", str(tmp_path / "runs"),
              "--config-root", str(REPO), "--launcher", "slurm", "--slurm-out", str(out),
              "--sbatch-option=--gres=gpu:1"])  # fmt: skip
    assert exit_.value.code == 0
    assert sorted(p.name for p in out.glob("*.s*")) == [
        "level_0.sbatch",
        "level_1.sbatch",
        "level_2.sbatch",
        "submit.sh",
    ]

    def runs_of(script: Path) -> list[str]:
        text = script.read_text()
        return [line.split()[0].strip("'") for line in text.split("RUNS=(\n")[1].split("\n)")[0].splitlines()]

    level0, level1, level2 = (runs_of(out / f"level_{n}.sbatch") for n in range(3))
    assert set(level0) == {f"captions/clip_mona/seed_{s}" for s in (1, 2)} | {
        f"table2/A/{m}/seed_{s}" for m in ("clip_mona", "clip_lora") for s in (1, 2)
    }
    assert set(level1) == {f"table2/A/clip_mona_ft/seed_{s}" for s in (1, 2)} | {
        f"table2/B/{m}/seed_{s}" for m in ("clip_mona", "clip_lora") for s in (1, 2)
    }
    assert set(level2) == {f"table2/B/clip_mona_ft/seed_{s}" for s in (1, 2)}
    text0 = (out / "level_0.sbatch").read_text()
    assert "#SBATCH --array=0-5\n" in text0 and "#SBATCH --gres=gpu:1\n" in text0
    assert f'--datasets {datasets} --run "${{RUNS[$SLURM_ARRAY_TASK_ID]}}"' in text0
    submit = (out / "submit.sh").read_text().splitlines()
    assert "JOB_0=$(sbatch --parsable level_0.sbatch)" in submit
    assert "JOB_1=$(sbatch --parsable --dependency=afterok:${JOB_0} level_1.sbatch)" in submit
    assert "JOB_2=$(sbatch --parsable --dependency=afterok:${JOB_1} level_2.sbatch)" in submit
    assert os.access(out / "submit.sh", os.X_OK)
    assert not (tmp_path / "runs").exists()  # written, not submitted or run


# ---------------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_data_scores_the_test_split_or_every_image(tmp_path):
    write_synthetic_dataset(tmp_path / "d", num_samples=20, size=64, seed=0)
    sizes = {}
    for score_on in ("test", "all"):
        dm = ZeroShotDataModule(score_on=score_on, root=str(tmp_path / "d"), image_size=32, label_names=None)
        dm.setup("test")
        sizes[score_on] = len(dm.test_dataloader().dataset)
        assert len(dm.splits["train"]) > 10  # the split itself is unchanged
    assert sizes == {"test": 2, "all": 20}
    with pytest.raises(ValueError, match="score_on must be 'test' or 'all', got 'val'"):
        ZeroShotDataModule(score_on="val", root=str(tmp_path / "d"))


@pytest.mark.parametrize(("score_on", "expected"), [("test", 2), ("all", 24)])
def test_usclip_test_zero_shot_scores_the_chosen_images(tmp_path, score_on, expected):
    conf = REPO / "tests" / "conf" / "vision_language"
    cli = main([
        "test", "--config", str(conf / "zeroshot.yaml"), f"--model.init_args.prompts={conf / 'prompts_tiny.yaml'}",
        "--data.class_path=usclip.data.ZeroShotDataModule", f"--data.init_args.score_on={score_on}",
        f"--data.init_args.root={tmp_path / 'data'}", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ])  # fmt: skip
    metrics = json.loads((Path(cli.trainer.log_dir) / "results" / "test_metrics.json").read_text())
    assert metrics["num_images"] == expected == len(cli.datamodule.splits["test"])
    written = (Path(cli.trainer.log_dir) / "splits" / "test.txt").read_text().split()
    assert len(written) == expected  # the run records which images it scored


def test_zero_shot_configs_resolve_for_the_three_datasets():
    parser = _grab_parser()
    for name, prompts in (("ln1", "lymph_node"), ("ln2", "lymph_node"), ("busi", "breast")):
        cfg = parser.parse_args(["test", "--config", f"configs/vision_language/zeroshot_{name}.yaml"])
        assert cfg.test.model.init_args.prompts == prompts
        assert cfg.test.data.class_path == "usclip.data.ZeroShotDataModule"
        assert cfg.test.data.init_args.score_on == "test"  # the default: the held-out split


# ------------------------------------------------------------------------------------------------- end to end
class PauseOnce(Callback):
    """At global step ``step`` touch ``marker`` and sleep (the test kills us); never again once ``marker`` exists."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker
        self.armed = not Path(marker).exists()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.armed and trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.current_epoch))
            time.sleep(600)


def _sweep(tmp_path: Path, manifest: Path, *extra: str) -> int:
    args = [
        "sweep",
        str(manifest),
        "--datasets",
        str(tmp_path / "datasets.yaml"),
        "--runs-root",
        str(tmp_path / "runs"),
    ]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--config-root", str(REPO), "--in-process", *extra])
    return int(exit_.value.code)


def _prepare(tmp_path: Path) -> None:
    _datasets_file(tmp_path)
    write_synthetic_dataset(tmp_path / "A", num_samples=24, size=96, seed=0)
    write_synthetic_dataset(tmp_path / "B", num_samples=12, size=96, seed=1)


# One seed in the default suite (seed 2, so that a run wired to seed 1's caption model or checkpoint fails); the two
# seeds of the slow case add cells of n=2 (their mean and sample std are checked on files in test_reporting.py).
@pytest.mark.parametrize(
    "seeds", [pytest.param("2", id="one_seed"), pytest.param("1,2", id="two_seeds", marks=pytest.mark.slow)]
)
def test_sweep_runs_the_tiny_manifest_end_to_end_and_skips_finished_runs(tmp_path, capsys, seeds):
    # 2 datasets x 3 methods (one "ft." behind a caption run, B an external test of the A model) x seeds
    _prepare(tmp_path)
    n, last = len(seeds.split(",")), seeds.split(",")[-1]
    assert _sweep(tmp_path, TINY, "--seeds", seeds) == 0
    assert f"ran: {7 * n}, done: 0, missing: 0, blocked: 0" in capsys.readouterr().out
    runs = tmp_path / "runs"
    cells = sorted(p.parent.parent for p in runs.glob("table2/*/*/seed_*/results/test_metrics.json"))
    assert len(cells) == 6 * n
    by_cell: dict[tuple[str, str], list[float]] = {}
    for run_dir in cells:
        info = json.loads((run_dir / "sweep_run.json").read_text())
        dataset, slug, seed = run_dir.parts[-3:]
        assert (info["table"], info["group"], info["dataset"], f"seed_{info['seed']}") == (
            "table2", "segmentation", dataset, seed)  # fmt: skip
        assert slugify(info["method"]) == slug and info["manifest"] == str(TINY)
        assert [c[:2] for c in info["commands"]] == ([["usclip", "test"]] if dataset == "B" else
                                                     [["usclip", "fit"], ["usclip", "test"]])  # fmt: skip
        metrics = json.loads((run_dir / "results" / "test_metrics.json").read_text())
        assert 0.0 <= metrics["dice"] <= 1.0
        # the external set is scored whole (12 images) with the A model of the same method and seed
        held_out = (run_dir / "splits" / "test.txt").read_text().split() if dataset == "A" else range(12)
        assert metrics["num_images"] == len(held_out) > 0
        by_cell.setdefault((info["method"], dataset), []).append(metrics["dice"])
        assert (run_dir / "sweep.log").read_text().startswith("# ")
    assert len(by_cell) == 6 and all(len(v) == n for v in by_cell.values())
    # `usclip report runs/` finds exactly the cells (the caption runs have no test results), names them as the
    # manifest does, and each cell is the mean and sample std of its runs' result files
    assert sorted(find_run_dirs([runs])) == cells
    table = aggregate([load_run(d) for d in cells])["table2"]
    assert set(table.cells) == {("segmentation", m, d) for m, d in by_cell}
    for (method, dataset), dices in by_cell.items():
        cell = table.cells[("segmentation", method, dataset)]["dice"]
        assert cell.n == n and cell.mean == pytest.approx(statistics.fmean(dices), abs=1e-12)
        assert cell.std == pytest.approx(statistics.stdev(dices) if n > 1 else 0.0, abs=1e-12)
    assert main_report([str(runs), "--output", str(tmp_path / "report")]) == 0
    report_csv = list(csv.DictReader((tmp_path / "report" / "table2.csv").open()))
    assert {r["method"] for r in report_csv} == {m for m, _ in by_cell}
    ext = json.loads((runs / f"table2/B/clip_mona_ft/seed_{last}/sweep_run.json").read_text())["commands"][0]
    assert ext[ext.index("--ckpt_path") + 1] == str(runs / f"table2/A/clip_mona_ft/seed_{last}/checkpoints/best.ckpt")
    ft = json.loads((runs / f"table2/A/clip_mona_ft/seed_{last}/sweep_run.json").read_text())["commands"][0]
    assert ft[ft.index("--model.init_args.adapter_checkpoint") + 1] == str(
        runs / f"captions/clip_mona/seed_{last}/adapters/best.safetensors"
    )
    assert (runs / f"captions/clip_mona/seed_{last}/adapters/best.safetensors").is_file()
    # started again: nothing reruns, no file changes
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    assert _sweep(tmp_path, TINY, "--seeds", seeds) == 0
    assert f"ran: 0, done: {7 * n}" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == stamps


def test_a_failed_run_stops_the_sweep_naming_the_run_and_its_log(tmp_path, capsys):
    _prepare(tmp_path)
    manifest = yaml.safe_load(TINY.read_text())
    manifest["tables"][0]["methods"]["CLIP (Mona)"] = {"args": {"--model.init_args.lr": "fast"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert _sweep(tmp_path, path, "--only", "CLIP (Mona)", "--seeds", "1") == 1
    err = capsys.readouterr().err
    log_file = tmp_path / "runs/table2/A/clip_mona/seed_1/sweep.log"
    assert "run table2/A/clip_mona/seed_1 (CLIP (Mona), A, seed 1) failed: `usclip fit` exited" in err
    assert str(log_file) in err and "lr" in log_file.read_text()
    assert not (tmp_path / "runs/table2/B").exists()  # the run after it was not started


def test_resume_continues_a_fit_from_last_ckpt_in_the_same_folder(tmp_path, capsys):
    # cheap twin of the kill test: a run whose fit stopped after epoch 0 (last.ckpt, no progress) is resumed
    _prepare(tmp_path)
    manifest = yaml.safe_load(TINY.read_text())
    manifest["args"] = {"--trainer.max_epochs": 2}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    run = next(r for r in expand_runs(load_manifest(path), [1]) if r.key == "table2/A/clip_mona/seed_1")
    plan = SweepPlan(tmp_path / "runs", load_datasets(tmp_path / "datasets.yaml"), REPO)
    first = [*build_commands(run, plan)[0][1:], "--trainer.max_epochs=1"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(first)
    run_dir = plan.run_dir(run)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert _sweep(tmp_path, path, "--only", "table2/A/clip_mona/seed_1") == 0
    log_text = (run_dir / "sweep.log").read_text()
    assert "# " in log_text and "resume: usclip fit" in log_text and "--ckpt_path last" in log_text
    import torch

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1 and last["global_step"] == 4  # continued: epoch 1 after epoch 0, 2 steps each
    assert sorted(p.name for p in (tmp_path / "runs/table2/A/clip_mona").iterdir()) == ["seed_1"]
    assert (run_dir / "results" / "test_metrics.json").is_file()


@pytest.mark.slow
def test_killed_sweep_resumes_the_killed_run_and_leaves_finished_runs_alone(tmp_path, capsys):
    _prepare(tmp_path)
    marker = tmp_path / "paused"
    pause = [{"class_path": "tests.test_sweep.PauseOnce", "init_args": {"step": 3, "marker": str(marker)}}]
    manifest = yaml.safe_load(TINY.read_text())
    manifest["tables"][0]["methods"]["CLIP (LoRA)"]["args"] = {
        "--trainer.max_epochs": 2,
        "--trainer.callbacks": json.dumps(pause),
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    only = ["--only", "A", "--only", "CLIP (Mona)", "--only", "CLIP (LoRA)", "--seeds", "1"]
    assert _sweep(tmp_path, path, "--only", "CLIP (Mona)", "--only", "A", "--seeds", "1") == 0  # finished before
    done = tmp_path / "runs/table2/A/clip_mona/seed_1"
    stamps = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "usclip", "sweep", str(path), "--datasets", str(tmp_path / "datasets.yaml"),
           "--runs-root", str(tmp_path / "runs"), "--config-root", str(REPO), *only]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its `usclip fit` child
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = tmp_path / "runs/table2/A/clip_lora/seed_1"
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "results").exists()

    assert _sweep(tmp_path, path, *only) == 0
    out = capsys.readouterr().out
    assert "table2/A/clip_mona/seed_1: finished before, skipped" in out
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == stamps
    log_text = (killed / "sweep.log").read_text()
    assert log_text.count("# ") >= 3 and "resume: usclip fit" in log_text
    import torch

    last = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1 and last["global_step"] == 4
    assert (killed / "results" / "test_metrics.json").is_file()
    assert sorted(p.name for p in killed.parent.iterdir()) == ["seed_1"]
