"""``usclip report``: the paper's tables from fabricated run directories, and through the real entry point."""

from __future__ import annotations

import csv
import json
import re
import statistics

import numpy as np
import pytest
import yaml
from PIL import Image

from usclip.cli import main
from usclip.paper import published_lookup
from usclip.reporting import (
    aggregate,
    dataset_name,
    find_run_dirs,
    format_markdown,
    load_run,
    method_name,
    short_title,
    weights_name,
    write_overlay_grids,
)

SEG = ("dice", "iou", "hd95", "asd")


def model_args(model_name="ViT-B-16", pretrained="openai", adapter="mona", head="paper", adapter_checkpoint=None):
    return {
        "model_name": model_name,
        "pretrained": pretrained,
        "adapter": adapter,
        "head": head,
        "adapter_checkpoint": adapter_checkpoint,
    }


def make_run(
    run_dir,
    metrics,
    *,
    sweep=None,
    task="Segmentation",
    model=None,
    root="data/BUSI",
    test_root=None,
    seed=1,
    logger_name="run",
    protocol=None,
):
    """A tested run: config.yaml, results/test_metrics.json and (with ``sweep``) sweep_run.json."""
    (run_dir / "results").mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {"logger": {"class_path": "TensorBoardLogger", "init_args": {"name": logger_name}}},
        "model": {"class_path": f"usclip.tasks.{task}", "init_args": model or model_args()},
        "data": {"class_path": "usclip.data.DataModule", "init_args": {"root": root, "test_root": test_root}},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    payload = dict(metrics) | {"num_images": 6}
    if protocol is not None:
        payload["metric_protocol"] = protocol
    (run_dir / "results" / "test_metrics.json").write_text(json.dumps(payload))
    if sweep is not None:
        info = {"seed": seed, "manifest": "paper", "commands": [["usclip", "test"]]} | sweep
        (run_dir / "sweep_run.json").write_text(json.dumps(info))
    return run_dir


def sweep_run(root, table, group, method, dataset, seed, metrics, **kwargs):
    """A run where the contract puts it: <root>/<table>/<dataset>/<slug>/seed_<seed>, with sweep_run.json."""
    slug = re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")
    # Table 3 has CLIP (Mona) etc. in both groups: the folder must tell them apart (how is the sweep's choice)
    slug = f"zero_shot_{slug}" if group == "zero-shot" else slug
    sweep = {"table": table, "group": group, "method": method, "dataset": dataset}
    run_dir = root / table / dataset / slug / f"seed_{seed}"
    return make_run(run_dir, metrics, sweep=sweep, seed=seed, logger_name=slug, **kwargs)


def seg(dice, iou=None, hd95=10.0, asd=2.0):
    return {"dice": dice, "iou": dice - 0.1 if iou is None else iou, "hd95": hd95, "asd": asd}


def report(args, capsys=None):
    with pytest.raises(SystemExit) as exc:
        main(["report", *map(str, args)])
    return exc.value.code


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def md_rows(text):
    """Markdown tables -> (column titles, {method: cells}); blocks of datasets merged; the group column dropped."""
    titles, rows, start = [], {}, 0
    for line in text.splitlines():
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if "Method" in cells:
            start = cells.index("Method")
            titles += cells[start + 1 :]
        else:
            rows.setdefault(cells[start], []).extend(cells[start + 1 :])
    return titles, rows


# --- cells: mean and sample std of the per-run files --------------------------------------------------------------

# three seeds of known numbers: method -> dataset -> per-seed metric dicts
KNOWN = {
    "CLIP (Mona)": {
        "BUSI": [seg(0.80, 0.70, 10.0, 2.0), seg(0.82, 0.71, 12.0, 2.5), seg(0.84, 0.75, 14.0, 3.3)],
        "LN-1": [seg(0.70, 0.60, 20.0, 5.0), seg(0.76, 0.61, 18.0, 4.0), seg(0.73, 0.65, 25.0, 6.0)],
    },
    "CLIPSeg": {
        "BUSI": [seg(0.78, 0.69, 11.0, 2.2), seg(0.79, 0.66, 9.5, 2.1), seg(0.75, 0.60, 13.0, 4.0)],
        "LN-1": [seg(0.71, 0.58, 19.0, 5.5), seg(0.69, 0.57, 21.0, 5.1), seg(0.72, 0.62, 24.0, 6.6)],
    },
    "CLIP (LoRA)": {
        "BUSI": [seg(0.70, 0.60, 15.0, 3.0), seg(0.72, 0.61, 16.0, 3.1), seg(0.71, 0.64, 17.0, 3.2)],
        "LN-1": [seg(0.65, 0.55, 30.0, 8.0), seg(0.66, 0.50, 28.0, 7.0), seg(0.60, 0.52, 33.0, 9.0)],
    },
}


@pytest.fixture
def table2_runs(tmp_path):
    root = tmp_path / "sweep"
    for method, by_dataset in KNOWN.items():
        for dataset, per_seed in by_dataset.items():
            for seed, metrics in enumerate(per_seed, start=1):
                sweep_run(root, "table2", "segmentation", method, dataset, seed, metrics)
    return root


def test_cells_equal_mean_and_sample_std_of_the_run_files(table2_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report([table2_runs, "--output", out]) == 0
    rows = {r["method"]: r for r in read_csv(out / "table2.csv")}
    # rows in the paper's order (not alphabetical: CLIPSeg sorts after CLIP (Mona))
    assert list(rows) == ["CLIP (LoRA)", "CLIPSeg", "CLIP (Mona)"]
    md_header, md = md_rows((out / "table2.md").read_text())
    # columns in the paper's order: LN-1 before BUSI
    assert md_header[:5] == ["LN-1 Dice ↑", "LN-1 IoU ↑", "LN-1 HD95 ↓", "LN-1 ASD ↓", "BUSI Dice ↑"]
    for method, by_dataset in KNOWN.items():
        assert rows[method]["group"] == "segmentation" and rows[method]["protocol"] == "strict"
        for dataset, per_seed in by_dataset.items():
            for metric in SEG:
                values = [m[metric] for m in per_seed]
                mean, std = statistics.fmean(values), statistics.stdev(values)  # sample std (n - 1)
                assert float(rows[method][f"{dataset}_{metric}_mean"]) == pytest.approx(mean, abs=1e-12)
                assert float(rows[method][f"{dataset}_{metric}_std"]) == pytest.approx(std, abs=1e-12)
                assert rows[method][f"{dataset}_{metric}_n"] == "3"
                scale = 100 if metric in ("dice", "iou") else 1
                text = md[method][[h.split()[:2] for h in md_header].index([dataset, _title(metric)])]
                assert text.strip("*").removeprefix("<u>").removesuffix("</u>") == (
                    f"{mean * scale:.2f} ± {std * scale:.2f}"
                )
    # one hand-checked cell: CLIP (Mona) BUSI Dice 80/82/84 -> 82.00 ± 2.00, the best of the column
    assert md["CLIP (Mona)"][md_header.index("BUSI Dice ↑")] == "**82.00 ± 2.00**"
    printed = capsys.readouterr().out
    assert "## table2 (18 runs)" in printed
    assert "Mean ± std (sample std) over 3 seeds; Dice, IoU in %; HD95, ASD in pixels." in printed
    assert not (out / "table3.md").exists()


def _title(metric):
    return {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd": "ASD", "acc": "Acc", "auc": "AUC"}[metric]


def test_marks_best_and_second_best_lower_is_better_and_printed_ties():
    runs = []
    for method, dice, hd in (("a", 0.8, 5.0), ("b", 0.7, 3.0), ("c", 0.6, 9.0), ("d", 0.600001, 9.000001)):
        runs.append(_run(method, seg(dice, hd95=hd)))
    text = format_markdown(aggregate(runs)["table2"])
    header, rows = md_rows(text)
    dice, hd95 = header.index("BUSI Dice ↑"), header.index("BUSI HD95 ↓")
    assert rows["a"][dice] == "**80.00**" and rows["b"][dice] == "<u>70.00</u>"  # one seed each: no "± 0.00"
    # c and d print the same value: they share the third rank (no mark), whatever the hidden digits
    assert rows["c"][dice] == rows["d"][dice] == "60.00"
    # HD95: lower is better
    assert rows["b"][hd95] == "**3.00**" and rows["a"][hd95] == "<u>5.00</u>"
    assert rows["c"][hd95] == rows["d"][hd95] == "9.00"


def test_methods_that_print_the_same_best_value_are_both_bold():
    """Ranks compare the printed values (two decimals): a tie at the top is two bold cells, the next underlined.

    Catches: ranks from the unrounded means (only the method with the larger hidden digits would be bold).
    """
    runs = [_run("a", seg(0.8, hd95=4.0)), _run("b", seg(0.800001, hd95=3.999999)), _run("c", seg(0.7, hd95=5.0))]
    header, rows = md_rows(format_markdown(aggregate(runs)["table2"]))
    for metric, best, second in (("BUSI Dice ↑", "80.00", "70.00"), ("BUSI HD95 ↓", "4.00", "5.00")):
        column = header.index(metric)
        assert rows["a"][column] == rows["b"][column] == f"**{best}**"
        assert rows["c"][column] == f"<u>{second}</u>"


def test_a_cell_over_fewer_seeds_says_so_and_non_finite_values_are_left_out():
    runs = [_run("a", seg(0.8), seed=s) for s in (1, 2, 3)]
    runs += [_run("b", seg(0.6), seed=1), _run("b", seg(0.7), seed=2)]  # seed 3 missing
    runs.append(_run("c", seg(0.5, hd95=float("inf")), seed=1))
    runs += [_run("c", seg(0.5, hd95=h), seed=s) for s, h in ((2, 4.0), (3, 6.0))]
    table = aggregate(runs)["table2"]
    header, rows = md_rows(format_markdown(table))
    dice, hd95 = header.index("BUSI Dice ↑"), header.index("BUSI HD95 ↓")
    assert rows["a"][dice] == "**80.00 ± 0.00**"
    assert rows["b"][dice] == f"<u>65.00 ± {statistics.stdev([60, 70]):.2f} (n=2)</u>"
    assert rows["c"][hd95] == f"**5.00 ± {statistics.stdev([4.0, 6.0]):.2f} (n=2)**"  # inf left out of the mean
    assert table.cells["segmentation", "c", "BUSI"]["dice"].n == 3


def test_one_seed_shows_no_zero_std_and_a_lone_method_is_not_bold():
    """Catches: ``± 0.00`` printed for a single run (a spread that was never measured), a lone method bolded."""
    runs = [_run("a", seg(0.8, hd95=4.0)), _run("b", seg(0.7, hd95=5.0), dataset="LN-1")]
    runs += [_run("b", seg(0.6, hd95=6.0), dataset="BUSI", seed=s) for s in (1, 2)]  # two seeds, same numbers
    header, rows = md_rows(format_markdown(aggregate(runs)["table2"]))
    busi, ln1 = header.index("BUSI Dice ↑"), header.index("LN-1 Dice ↑")
    assert rows["a"][busi] == "**80.00 (n=1)**"  # one of two seeds: the value and n=1, never ± 0.00
    assert rows["b"][busi] == "<u>60.00 ± 0.00</u>"  # two seeds that agree: a measured zero spread
    assert rows["b"][ln1] == "70.00 (n=1)"  # alone in its column: no mark
    only = format_markdown(aggregate([_run("a", seg(0.8)), _run("b", seg(0.7))])["table2"])
    assert "±" not in md_rows(only)[1]["a"][0] and "(n=1)" not in only.split("\n- ")[0]
    assert "One seed per cell (n=1): the value alone, no std" in only


def test_latex_table_booktabs_marks_and_escapes(tmp_path, capsys):
    """``<table>.tex``: booktabs rules, \\textbf best, \\underline second, $\\pm$, $\\downarrow$, escaped names.

    Catches: a raw ``_`` / ``&`` / ``%`` (LaTeX stops), ``±`` left as Unicode, marks swapped, a lone method bold.
    """
    from usclip.reporting import format_latex, latex_escape

    assert (
        latex_escape("a_b & 5% #1 {x} ~^\\")
        == r"a\_b \& 5\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )
    root = tmp_path / "sweep"
    for seed, (d1, d2) in enumerate(((0.80, 0.70), (0.84, 0.72)), start=1):
        sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", seed, seg(d1, hd95=4.0))
        sweep_run(root, "table2", "segmentation", "my_method", "BUSI", seed, seg(d2, hd95=6.0))
        sweep_run(root, "table2", "segmentation", "UNet", "BUSI", seed, seg(0.95, hd95=1.0))
        sweep_run(root, "table2", "segmentation", "my_method", "DDTI", seed, seg(0.5))
    out = tmp_path / "report"
    assert report([root, "--output", out, "--grid-images", "0"]) == 0
    tex = (out / "table2.tex").read_text()
    assert tex == format_latex(aggregate([load_run(d) for d in find_run_dirs([root])])["table2"])
    for command in ("\\toprule", "\\midrule", "\\bottomrule", "\\cmidrule(lr){2-5}", "\\cmidrule(lr){6-9}"):
        assert command in tex
    assert "\\begin{tabular}{lcccccccc}" in tex and "\\multicolumn{4}{c}{BUSI}" in tex
    assert "Dice $\\uparrow$" in tex and "HD95 $\\downarrow$" in tex and "±" not in tex and "↓" not in tex
    rows = {line.split(" & ")[0]: line.split(" & ")[1:] for line in tex.splitlines() if line.endswith(" \\\\")}
    assert rows["CLIP (Mona)"][0] == "\\textbf{82.00 $\\pm$ 2.83}"  # best Dice, 80/84
    assert rows["my\\_method"][0] == "\\underline{71.00 $\\pm$ 1.41}"
    assert rows["my\\_method"][2] == "\\underline{6.00 $\\pm$ 0.00}" and rows["CLIP (Mona)"][2].startswith(
        "\\textbf{4.00"
    )
    assert rows["UNet $^\\dagger$"][0] == "95.00 $\\pm$ 0.00"  # a reference row: best value, no mark
    assert rows["my\\_method"][4] == "50.00 $\\pm$ 0.00" and rows["CLIP (Mona)"][4] == "--"  # DDTI: lone, no mark
    assert "Dice, IoU in \\%" in tex and tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert tex.count("{") == tex.count("}")
    assert f"table2.csv and {out / 'table2.tex'}" in capsys.readouterr().out


def test_datasets_are_split_into_blocks_of_three_like_the_paper():
    runs = [_run("CLIP (Mona)", seg(0.8), dataset=d) for d in ("TN3K", "BUSI", "LN-2", "DDTI", "LN-1")]
    text = format_markdown(aggregate(runs)["table2"])
    headers = [line for line in text.splitlines() if line.startswith("| Method")]
    assert [[h.split()[0] for h in line.strip("| ").split(" | ")[1::4]] for line in headers] == [
        ["LN-1", "LN-2", "BUSI"],
        ["DDTI", "TN3K"],
    ]
    assert text.count("| CLIP (Mona) |") == 2 and text.count("Metric protocol") == 1
    one = format_markdown(aggregate(runs)["table2"], datasets_per_block=0)
    assert len([line for line in one.splitlines() if line.startswith("| Method")]) == 1
    assert md_rows(one) == md_rows(text)


def _run(method, metrics, group="segmentation", dataset="BUSI", seed=1, reference=False, table="table2"):
    from usclip.reporting import RunResult

    return RunResult(f"/runs/{method}/{seed}", table, group, method, dataset, seed, metrics, "strict", reference)


# --- reference rows --------------------------------------------------------------------------------------------------


def test_reference_row_with_the_best_value_gets_no_mark_and_the_best_compared_method_is_bold(tmp_path):
    root = tmp_path / "sweep"
    for seed in (1, 2, 3):
        sweep_run(root, "table2", "segmentation", "UNet", "BUSI", seed, seg(0.90, hd95=1.0))
        sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", seed, seg(0.85, hd95=4.0))
        sweep_run(root, "table2", "segmentation", "CLIPSeg", "BUSI", seed, seg(0.80, hd95=6.0))
        sweep_run(root, "table2", "segmentation", "DINOv2", "BUSI", seed, seg(0.50, hd95=30.0))
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    header, rows = md_rows((out / "table2.md").read_text())
    assert list(rows) == ["UNet †", "CLIPSeg", "DINOv2", "CLIP (Mona)"]
    for metric, best, second in (("BUSI Dice ↑", "85.00", "80.00"), ("BUSI HD95 ↓", "4.00", "6.00")):
        col = header.index(metric)
        assert rows["UNet †"][col] in ("90.00 ± 0.00", "1.00 ± 0.00")  # best value, no mark
        assert rows["CLIP (Mona)"][col] == f"**{best} ± 0.00**"
        assert rows["CLIPSeg"][col] == f"<u>{second} ± 0.00</u>"
    assert "† reference, not ranked" in (out / "table2.md").read_text()
    reference = {r["method"]: r["reference"] for r in read_csv(out / "table2.csv")}
    assert reference == {"UNet": "1", "CLIPSeg": "0", "DINOv2": "0", "CLIP (Mona)": "0"}


def test_resnet18_and_native_unet_configs_are_reference_rows(tmp_path):
    run = make_run(tmp_path / "old_unet", seg(0.9), model=model_args("smp:Unet/resnet34", "imagenet", None, "native"))
    result = load_run(run)
    assert result.reference and result.method == "smp:Unet/resnet34 (imagenet)"
    cls = model_args("timm:resnet18", "timm", None, "native")
    run = make_run(tmp_path / "old_resnet", {"acc": 0.9, "auc": 0.95}, task="ClassificationTask", model=cls)
    assert load_run(run).reference and load_run(run).group == "supervised"
    # a whole model that is not a reference baseline (e.g. CLIPSeg, head native) is ranked
    clipseg = model_args("hf:CIDAS/clipseg-rd64-refined", "hf", None, "native")
    assert not load_run(make_run(tmp_path / "clipseg", seg(0.8), model=clipseg)).reference
    with_sweep = sweep_run(tmp_path / "s", "table3", "supervised", "ResNet18", "BUSI", 1, {"acc": 0.9, "auc": 0.9})
    assert load_run(with_sweep).reference


# --- methods that share an adapter -----------------------------------------------------------------------------------

SHARED_ADAPTER = {
    "OpenAI CLIP ViT-B-16 + Mona": model_args(),
    "BiomedCLIP + Mona": model_args(pretrained="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
    "MetaCLIP ViT-B-16-quickgelu (metaclip_400m) + Mona": model_args("ViT-B-16-quickgelu", "metaclip_400m"),
    "ViT-B-16 (unimed_clip_vit_b16.pt) + Mona": model_args(pretrained="weights/unimed_clip_vit_b16.pt"),
    "OpenAI CLIP ViT-B-16 + Mona (ft.)": model_args(adapter_checkpoint="runs/captions/adapters/best.safetensors"),
}


def test_methods_sharing_an_adapter_get_separate_rows_without_sweep_run(tmp_path):
    root = tmp_path / "runs"
    for k, args in enumerate(SHARED_ADAPTER.values()):
        for seed in (0, 1):
            make_run(root / f"m{k}" / f"version_{seed}", seg(0.5 + k / 10), model=args, seed=seed)
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    rows = {r["method"]: r for r in read_csv(out / "table2.csv")}
    assert sorted(rows) == sorted(SHARED_ADAPTER)
    for k, name in enumerate(SHARED_ADAPTER):
        assert float(rows[name]["BUSI_dice_mean"]) == pytest.approx(0.5 + k / 10)
        assert rows[name]["BUSI_dice_n"] == "2"


def test_methods_sharing_an_adapter_get_separate_rows_with_sweep_run(tmp_path):
    # the same config.yaml (CLIP + Mona) in all three: only sweep_run.json tells them apart
    root = tmp_path / "sweep"
    for k, method in enumerate(("CLIP (Mona)", "CLIP (Mona, ft.)", "BioMedCLIP")):
        for seed in (1, 2, 3):
            sweep_run(root, "table2", "segmentation", method, "DDTI", seed, seg(0.5 + k / 10))
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    rows = {r["method"]: r for r in read_csv(out / "table2.csv")}
    assert list(rows) == ["BioMedCLIP", "CLIP (Mona)", "CLIP (Mona, ft.)"]  # the paper's order
    assert [float(rows[m]["DDTI_dice_mean"]) for m in rows] == pytest.approx([0.7, 0.5, 0.6])
    # --method-from name: the logger names (the sweep's slugs); --method-from config: the configs, all alike
    assert report([root, "--output", out, "--method-from", "name"]) == 0
    assert [r["method"] for r in read_csv(out / "table2.csv")] == ["biomedclip", "clip_mona", "clip_mona_ft"]
    assert report([root, "--output", out, "--method-from", "config"]) == 0
    (only,) = read_csv(out / "table2.csv")
    assert only["method"] == "OpenAI CLIP ViT-B-16 + Mona" and only["DDTI_dice_n"] == "9"


def test_method_name_from_config_and_logger_name():
    assert method_name({"model": {"init_args": model_args("m", None, None, "native")}}) == "m (random init)"
    assert method_name({"model": {"init_args": model_args("m", "lvd142m", None)}}) == "m (lvd142m)"
    assert method_name({"model": {"init_args": model_args(adapter="lora", head="linear")}}) == (
        "OpenAI CLIP ViT-B-16 + LoRA + linear head"
    )
    # zero-shot configs have no adapter key: vanilla vs caption-tuned
    zero_shot = {"model_name": "ViT-B-16", "pretrained": "openai", "adapter_checkpoint": "a.safetensors"}
    assert method_name({"model": {"init_args": zero_shot}}) == "OpenAI CLIP ViT-B-16 (ft.)"
    assert method_name({"trainer": {"logger": {"init_args": {"name": "clip_lora"}}}}, "name") == "clip_lora"
    with pytest.raises(ValueError, match=r"logger\.init_args\.name"):
        method_name({}, "name")
    assert weights_name("ViT-B-16", "hf-hub:org/other-clip") == "org/other-clip"


@pytest.mark.parametrize(
    ("folder", "name"),
    [("BUSI", "BUSI"), ("ln_1", "LN-1"), ("LN-2", "LN-2"), ("microUS", "Prostate"), ("tn3k", "TN3K"), ("x", "x")],
)
def test_dataset_folders_map_to_the_paper_names(folder, name):
    assert dataset_name(folder) == name


# --- Table 3: groups -------------------------------------------------------------------------------------------------


def test_table3_prints_zero_shot_then_supervised_and_ranks_within_each_group(tmp_path):
    root = tmp_path / "sweep"
    cls = {"model": model_args(), "task": "ClassificationTask"}
    for seed in (1, 2):
        # the same method name in both groups: separate rows
        sweep_run(root, "table3", "supervised", "CLIP (Mona)", "LN-1", seed, {"acc": 0.85, "auc": 0.90}, **cls)
        sweep_run(root, "table3", "supervised", "ResNet18", "LN-1", seed, {"acc": 0.95, "auc": 0.99}, **cls)
        sweep_run(root, "table3", "supervised", "MetaCLIP", "LN-1", seed, {"acc": 0.80, "auc": 0.92}, **cls)
        sweep_run(root, "table3", "zero-shot", "CLIP (Mona)", "LN-1", seed, {"acc": 0.55, "auc": 0.52}, **cls)
        sweep_run(root, "table3", "zero-shot", "CLIP (vanilla)", "LN-1", seed, {"acc": 0.58, "auc": 0.50}, **cls)
        sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "LN-1", seed, seg(0.7))
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    lines = [line for line in (out / "table3.md").read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| Group | Method | LN-1 Acc ↑ | LN-1 AUC ↑ |"
    assert lines[1:] == [
        "| Zero-shot | CLIP (vanilla) | **58.00 ± 0.00** | <u>50.00 ± 0.00</u> |",
        "|  | CLIP (Mona) | <u>55.00 ± 0.00</u> | **52.00 ± 0.00** |",
        "| Supervised | ResNet18 † | 95.00 ± 0.00 | 99.00 ± 0.00 |",
        "|  | MetaCLIP | <u>80.00 ± 0.00</u> | **92.00 ± 0.00** |",
        "|  | CLIP (Mona) | **85.00 ± 0.00** | <u>90.00 ± 0.00</u> |",
    ]
    rows = [(r["group"], r["method"]) for r in read_csv(out / "table3.csv")]
    assert rows[:2] == [("zero-shot", "CLIP (vanilla)"), ("zero-shot", "CLIP (Mona)")]
    assert "Dice" not in (out / "table3.md").read_text() and "Acc" not in (out / "table2.md").read_text()


def test_all_metrics_adds_sensitivity_specificity_and_f1_to_table3_only():
    cls = {"acc": 0.8, "auc": 0.9, "sensitivity": 0.7, "specificity": 0.85, "f1": 0.75}
    runs = [_run("CLIP (Mona)", cls, group="supervised", table="table3"), _run("CLIP (Mona)", seg(0.8))]
    tables = aggregate(runs)
    assert md_rows(format_markdown(tables["table3"]))[0] == ["BUSI Acc ↑", "BUSI AUC ↑"]
    header, rows = md_rows(format_markdown(tables["table3"], all_metrics=True))
    assert header == ["BUSI Acc ↑", "BUSI AUC ↑", "BUSI Sens ↑", "BUSI Spec ↑", "BUSI F1 ↑"]
    assert rows["CLIP (Mona)"][2:] == ["70.00", "85.00", "75.00"]  # one seed, a lone method: no std, no mark
    assert md_rows(format_markdown(tables["table2"], all_metrics=True))[0] == [f"BUSI {t}" for t in SEG_TITLES]


SEG_TITLES = ("Dice ↑", "IoU ↑", "HD95 ↓", "ASD ↓")


def test_zero_shot_and_external_test_runs_without_sweep_run(tmp_path):
    zs = {"model_name": "ViT-B-16", "pretrained": "openai", "prompts": "lymph_node", "adapter_checkpoint": None}
    run = make_run(tmp_path / "zs", {"acc": 0.6, "auc": 0.5}, task="ZeroShotClassifier", model=zs, root="data/LN1")
    result = load_run(run)
    assert (result.table, result.group, result.dataset, result.method) == (
        "table3",
        "zero-shot",
        "LN-1",
        "OpenAI CLIP ViT-B-16",
    )
    # LN-2: a test-only run of an LN-1 model: the dataset is the external test folder
    run = make_run(tmp_path / "ln2", seg(0.7), root=None, test_root="data/LN2")
    assert load_run(run).dataset == "LN-2"


# --- the paper's numbers ---------------------------------------------------------------------------------------------


def test_published_numbers_ship_with_the_package_in_the_paper_layout():
    from usclip.paper import TABLES, published

    values = published()
    assert len(values) == 10 * 6 * 4 + 5 * 3 * 2 + 9 * 3 * 2
    lookup = published_lookup()
    assert lookup["table2", "segmentation", "UNet", "LN-1", "dice"] == 79.72
    assert lookup["table3", "supervised", "CLIP (Mona, ft.)", "LN-2", "auc"] == 85.04
    assert {v.unit for v in values if v.metric in ("HD95", "ASD")} == {"px"}
    for spec in TABLES.values():  # every cell of the layout has a published value, and nothing else
        cells = {
            (spec.name, g, m, d, k)
            for g in spec.groups
            for m in spec.methods[g]
            for d in spec.datasets
            for k in spec.metrics
        }
        assert cells == {key for key in lookup if key[0] == spec.name}
        # methods in the file's (the paper's) order
        for group in spec.groups:
            in_file = list(dict.fromkeys(v.method for v in values if v.table == spec.name and v.task == group))
            assert tuple(in_file) == spec.methods[group]


@pytest.mark.parametrize("protocol", ["authors", "strict", None])
def test_compare_paper_puts_the_published_value_and_the_exact_difference_beside_ours(tmp_path, protocol):
    root = tmp_path / "sweep"
    for seed, (dice, hd95) in enumerate(((0.80, 10.0), (0.82, 12.0), (0.84, 14.0)), start=1):
        metrics = seg(dice, iou=0.7, hd95=hd95, asd=3.0)
        sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", seed, metrics, protocol=protocol)
        sweep_run(root, "table2", "segmentation", "my method", "BUSI", seed, metrics, protocol=protocol)
    out = tmp_path / "report"
    assert report([root, "--output", out, "--compare-paper"]) == 0
    paper = {m: published_lookup()["table2", "segmentation", "CLIP (Mona)", "BUSI", m] for m in SEG}
    header, rows = md_rows((out / "table2.md").read_text())
    ours = {"dice": 82.0, "iou": 70.0, "hd95": 12.0, "asd": 3.0}  # percent / pixels
    stds = {"dice": 2.0, "iou": 0.0, "hd95": 2.0, "asd": 0.0}
    for metric in SEG:
        cell = rows["CLIP (Mona)"][[h.split()[1] for h in header].index(_title(metric))]
        expected = f"{ours[metric]:.2f} ± {stds[metric]:.2f} ({paper[metric]:.2f}, {ours[metric] - paper[metric]:+.2f})"
        assert re.sub(r"\*\*|<u>|</u>", "", cell) == expected
    # a method the paper does not have: ours only
    assert rows["my method"][0] in ("**82.00 ± 2.00**", "82.00 ± 2.00")
    csv_rows = {r["method"]: r for r in read_csv(out / "table2.csv")}
    mona = csv_rows["CLIP (Mona)"]
    assert float(mona["BUSI_dice_paper"]) == pytest.approx(paper["dice"] / 100, abs=1e-12)  # raw units, like _mean
    assert float(mona["BUSI_dice_diff"]) == pytest.approx(0.82 - paper["dice"] / 100, abs=1e-12)
    assert float(mona["BUSI_hd95_paper"]) == paper["hd95"]
    assert float(mona["BUSI_hd95_diff"]) == pytest.approx(12.0 - paper["hd95"], abs=1e-12)
    assert csv_rows["my method"]["BUSI_dice_paper"] == csv_rows["my method"]["BUSI_dice_diff"] == ""
    text = (out / "table2.md").read_text()
    assert f"Metric protocol: `{protocol or 'strict'}`." in text
    assert ("not like for like" in text) == (protocol != "authors")
    # Table 2 has 10 methods x 6 datasets x 4 metrics; CLIP (Mona) on BUSI fills 4 of them
    assert "236 of the paper's cells of this table have no run (the first: UNet on LN-1, Dice, segmentation)." in text


# --- metric protocols ------------------------------------------------------------------------------------------------


def test_a_table_that_mixes_metric_protocols_is_refused_naming_two_runs(tmp_path, capsys):
    root = tmp_path / "sweep"
    strict = sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", 1, seg(0.8), protocol="strict")
    sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", 2, seg(0.8))  # missing = strict
    authors = sweep_run(root, "table2", "segmentation", "CLIP (LoRA)", "BUSI", 1, seg(0.8), protocol="authors")
    assert report([root, "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "table2 mixes metric protocols" in err and str(strict) in err and str(authors) in err
    assert not (tmp_path / "out" / "table2.md").exists()


def test_tables_may_differ_in_protocol_and_each_prints_its_own(tmp_path):
    root = tmp_path / "sweep"
    cls = {"task": "ClassificationTask"}
    sweep_run(root, "table2", "segmentation", "CLIP (Mona)", "BUSI", 1, seg(0.8), protocol="authors")
    sweep_run(root, "table3", "supervised", "CLIP (Mona)", "BUSI", 1, {"acc": 0.8, "auc": 0.9}, **cls)
    assert report([root, "--output", tmp_path / "out"]) == 0
    assert "Metric protocol: `authors`." in (tmp_path / "out" / "table2.md").read_text()
    assert "Metric protocol: `strict`." in (tmp_path / "out" / "table3.md").read_text()
    assert [r["protocol"] for r in read_csv(tmp_path / "out" / "table3.csv")] == ["strict"]


def test_bad_protocol_and_bad_sweep_run_files_are_clear_errors(tmp_path):
    run = make_run(tmp_path / "a", seg(0.8), protocol="loose")
    with pytest.raises(ValueError, match=r"a/results/test_metrics\.json: metric_protocol must be one of .*'loose'"):
        load_run(run)
    run = sweep_run(tmp_path, "table2", "supervised", "CLIP (Mona)", "BUSI", 1, seg(0.8))
    with pytest.raises(ValueError, match=r"sweep_run\.json: group of table2 must be one of \('segmentation',\)"):
        load_run(run)
    run = make_run(tmp_path / "b", seg(0.8), sweep={"table": "table9", "group": "x", "method": "m", "dataset": "d"})
    with pytest.raises(ValueError, match=r"table must be one of \['table2', 'table3'\], got 'table9'"):
        load_run(run)


# --- sweep protocols (authors / usclip) -------------------------------------------------------------------------------


def protocol_run(root, protocol, table, group, method, dataset, seed, metrics, metric_protocol, **kwargs):
    """A sweep run of one protocol where the sweep puts it: <root>/<protocol>/<table>/<dataset>/<slug>/seed_<k>.

    ``protocol=None``: a sweep_run.json written before protocols existed (no "protocol" key).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")
    sweep = {"table": table, "group": group, "method": method, "dataset": dataset}
    sweep |= {"protocol": protocol} if protocol is not None else {}
    sweep |= {"deterministic": True} if kwargs.pop("deterministic", False) else {}
    folder = root / (protocol or "usclip") / table / dataset / slug / f"seed_{seed}"
    return make_run(folder, metrics, sweep=sweep, seed=seed, protocol=metric_protocol, **kwargs)


def test_compare_paper_shows_the_protocol_of_each_row_and_both_protocols_beside_the_paper(tmp_path):
    root = tmp_path / "runs"
    authors_dice, usclip_dice = (0.80, 0.82, 0.84), (0.70, 0.71, 0.75)
    for seed in (1, 2, 3):
        dice_a, dice_u = authors_dice[seed - 1], usclip_dice[seed - 1]
        protocol_run(root, "authors", "table2", "segmentation", "CLIP (Mona)", "BUSI", seed, seg(dice_a), "authors")
        protocol_run(root, "usclip", "table2", "segmentation", "CLIP (Mona)", "BUSI", seed, seg(dice_u), "strict")
        protocol_run(root, "authors", "table2", "segmentation", "CLIPSeg", "BUSI", seed, seg(0.78), "authors")
        # written before protocols existed: the usclip protocol (the paper manifest's configs as shipped)
        protocol_run(root, None, "table2", "segmentation", "UNet", "BUSI", seed, seg(0.9), "strict")
    out = tmp_path / "report"
    assert report([root, "--output", out, "--compare-paper", "--grid-images", "0"]) == 0
    text = (out / "table2.md").read_text()
    lines = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in lines[0][:2]] == ["Method", "Protocol"]
    rows = [[c.strip() for c in line] for line in lines[1:5]]  # the first table, before the side-by-side one
    # the paper's order (UNet, CLIPSeg, CLIP (Mona)), a method's protocols adjacent, authors before usclip
    assert [r[:2] for r in rows] == [["UNet †", "usclip"], ["CLIPSeg", "authors"], ["CLIP (Mona)", "authors"],
                                     ["CLIP (Mona)", "usclip"]]  # fmt: skip
    paper = {m: published_lookup()["table2", "segmentation", "CLIP (Mona)", "BUSI", m] for m in SEG}
    mean_a, mean_u = 100 * statistics.fmean(authors_dice), 100 * statistics.fmean(usclip_dice)
    std_u = 100 * statistics.stdev(usclip_dice)
    # ranked within each protocol: usclip's CLIP (Mona) is its protocol's lone compared method (UNet is a
    # reference row), so it is not bold, though it would be were it ranked against the authors' rows
    assert rows[2][2] == f"**{mean_a:.2f} ± 2.00** ({paper['dice']:.2f}, {mean_a - paper['dice']:+.2f})"
    assert rows[3][2] == f"{mean_u:.2f} ± {std_u:.2f} ({paper['dice']:.2f}, {mean_u - paper['dice']:+.2f})"
    assert rows[1][2].startswith("<u>78.00 ± 0.00</u>")
    # side by side: only cells that both protocols ran (CLIP (Mona) on BUSI), with the paper's number
    side = text[text.index("Protocols side by side") :]
    side_rows = [
        [c.strip() for c in line.strip("|").split(" | ")] for line in side.splitlines() if line.startswith("| ")
    ]
    assert side_rows[0] == ["Group", "Method", "Dataset", "Metric", "Paper", "authors", "usclip", "authors − paper",
                            "usclip − paper"]  # fmt: skip
    assert [r[1] for r in side_rows[1:]] == ["CLIP (Mona)"] * 4
    assert side_rows[1] == ["segmentation", "CLIP (Mona)", "BUSI", "Dice", f"{paper['dice']:.2f}",
                            f"{mean_a:.2f} ± 2.00", f"{mean_u:.2f} ± {std_u:.2f}",
                            f"{mean_a - paper['dice']:+.2f}", f"{mean_u - paper['dice']:+.2f}"]  # fmt: skip
    assert "Metric protocol: `authors` (authors rows), `strict` (strict rows)" not in text
    assert "Metric protocol: `authors` (authors rows), `strict` (usclip rows)." in text
    assert "Warning: these runs (usclip rows) use the `strict` metric protocol" in text
    assert "these runs (authors rows)" not in text
    # CSV: a row per method and protocol; the side-by-side CSV in raw units
    csv_rows = {(r["method"], r["sweep_protocol"]): r for r in read_csv(out / "table2.csv")}
    assert sorted(csv_rows) == [("CLIP (Mona)", "authors"), ("CLIP (Mona)", "usclip"), ("CLIPSeg", "authors"),
                                ("UNet", "usclip")]  # fmt: skip
    assert csv_rows["CLIP (Mona)", "usclip"]["protocol"] == "strict"
    assert float(csv_rows["CLIP (Mona)", "usclip"]["BUSI_dice_mean"]) == pytest.approx(mean_u / 100, abs=1e-12)
    side_csv = read_csv(out / "table2_protocols.csv")
    assert [(r["method"], r["metric"]) for r in side_csv] == [("CLIP (Mona)", m) for m in SEG]
    dice = side_csv[0]
    assert float(dice["paper"]) == pytest.approx(paper["dice"] / 100, abs=1e-12)
    assert float(dice["authors_mean"]) == pytest.approx(mean_a / 100, abs=1e-12) and dice["usclip_n"] == "3"
    assert float(dice["usclip_diff"]) == pytest.approx((mean_u - paper["dice"]) / 100, abs=1e-12)
    # the library refuses to fold two protocols into one ResultTable
    with pytest.raises(ValueError, match=r"table2 holds runs of several sweep protocols \['authors', 'usclip'\]"):
        aggregate([load_run(d) for d in find_run_dirs([root])])


def test_one_protocol_says_so_and_a_zero_shot_cell_run_once_shows_no_std(tmp_path):
    root = tmp_path / "runs"
    cls = {"task": "ClassificationTask"}
    for seed in (1, 2, 3):
        metrics = {"acc": 0.8 + seed / 100, "auc": 0.9}
        protocol_run(root, "authors", "table3", "supervised", "CLIP (Mona)", "LN-1", seed, metrics, "authors", **cls)
    protocol_run(root, "authors", "table3", "zero-shot", "CLIP (vanilla)", "LN-1", 1, {"acc": 0.5813, "auc": 0.5},
                 "authors", deterministic=True, **cls)  # fmt: skip
    # a zero-shot cell whose three runs load three caption runs: mean ± std as usual
    for seed in (1, 2, 3):
        protocol_run(root, "authors", "table3", "zero-shot", "CLIP (LoRA, ft.)", "LN-1", seed,
                     {"acc": 0.6 + seed / 100, "auc": 0.5}, "authors", **cls)  # fmt: skip
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    text = (out / "table3.md").read_text()
    header, rows = md_rows(text)
    assert "Protocol" not in header
    assert rows["CLIP (vanilla)"][0] == "<u>58.13</u>"  # no "± 0.00", no "(n=1)"; second best
    assert rows["CLIP (LoRA, ft.)"][0] == "**62.00 ± 1.00**"
    assert "- Protocol: `authors` (`usclip sweep`), every cell." in text
    assert "- A value without ± ran once: nothing trains (zero-shot), so every seed gives the same numbers." in text
    assert "Mean ± std (sample std) over 3 seeds" in text and "(n=…)" not in text
    assert [r["sweep_protocol"] for r in read_csv(out / "table3.csv")] == ["authors"] * 3


def test_the_sweep_protocol_of_a_run(tmp_path):
    cases = [({"protocol": "authors"}, "authors"), ({"protocol": None}, None), ({}, "usclip")]
    for n, (extra, expected) in enumerate(cases):
        run = make_run(tmp_path / str(n), seg(0.8), sweep={"table": "table2", "group": "segmentation",
                                                           "method": "M", "dataset": "BUSI"} | extra)  # fmt: skip
        assert load_run(run).sweep_protocol == expected
    # an old sweep_run.json of another manifest than the paper's, and a run without sweep_run.json: no protocol
    sweep = {"table": "table2", "group": "segmentation", "method": "M", "dataset": "BUSI", "manifest": "my/m.yaml"}
    other = make_run(tmp_path / "other", seg(0.8), sweep=sweep)
    assert load_run(other).sweep_protocol is None
    assert load_run(make_run(tmp_path / "hand", seg(0.8))).sweep_protocol is None


# --- old runs --------------------------------------------------------------------------------------------------------


def test_old_runs_without_sweep_run_or_protocol_still_work(tmp_path, capsys):
    root = tmp_path / "runs"
    for adapter, base in (("lora", 0.6), ("mona", 0.7)):
        for seed in (0, 1, 2):
            metrics = seg(base + seed / 100) | {"dice_std": 0.1}
            make_run(
                root / f"busi_{adapter}" / f"version_{seed}", metrics, model=model_args(adapter=adapter), seed=seed
            )
    out = tmp_path / "report"
    assert report([root, "--output", out]) == 0
    rows = {r["method"]: r for r in read_csv(out / "table2.csv")}
    assert sorted(rows) == ["OpenAI CLIP ViT-B-16 + LoRA", "OpenAI CLIP ViT-B-16 + Mona"]
    assert float(rows["OpenAI CLIP ViT-B-16 + Mona"]["BUSI_dice_mean"]) == pytest.approx(0.71)
    assert float(rows["OpenAI CLIP ViT-B-16 + Mona"]["BUSI_dice_std"]) == pytest.approx(0.01)
    assert {r["protocol"] for r in rows.values()} == {"strict"}
    assert "Metric protocol: `strict`." in capsys.readouterr().out


def test_report_errors_name_the_run_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report([tmp_path / "empty"]) == 2
    assert f"RUN_DIR {tmp_path / 'empty'} holds no tested run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"has no results/test_metrics\.json"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "results").mkdir()
    (tmp_path / "empty" / "results" / "test_metrics.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError,
        match=r"has no config\.yaml, hparams\.yaml or checkpoints/\*\.ckpt \(and no sweep_run\.json\)",
    ):
        load_run(tmp_path / "empty")


# --- overlay grids ---------------------------------------------------------------------------------------------------


def test_overlay_grid_compares_methods_on_the_same_images(tmp_path, caplog):
    """One figure per dataset, rows the images all methods share, columns the methods; legend and scale bars.

    Catches: images only one method has, a method's other seed, the legend in another palette than the PNGs',
    a scale bar without spacing, a grid drawn over overlays of two palettes.
    """
    from usclip.visualize import overlay_text, save_png

    colours = {"lora": (255, 0, 255), "mona": (0, 0, 255)}
    root = tmp_path / "runs"
    for adapter in colours:
        for seed in (0, 1, 2):
            run = make_run(root / adapter / f"version_{seed}", seg(0.7), model=model_args(adapter=adapter), seed=seed)
            for image_id in ("a", "b", "c"):
                if adapter == "mona" and image_id == "c":
                    continue  # only ids every method has make it into the grid
                picture = np.zeros((16, 24, 3), dtype=np.uint8)
                picture[:] = colours[adapter] if seed == 0 else (0, 255, 0)  # other seeds: never shown
                spacing = (0.5, 0.25) if adapter == "lora" else None
                save_png(picture, run / "overlays" / f"{image_id}.png", overlay_text("okabe-ito", spacing))
    runs = [load_run(d) for d in find_run_dirs([root])]
    files = write_overlay_grids(runs, tmp_path / "out", formats=("png", "svg"), dpi=50)
    assert [p.name for p in files] == ["overlays_BUSI.png", "overlays_BUSI.svg"]
    svg = (tmp_path / "out" / "overlays_BUSI.svg").read_text()
    assert "OpenAI CLIP…-16 + LoRA" in svg and "missed lesion" in svg and ">a<" in svg and ">b<" in svg
    assert ">c<" not in svg and svg.count("mm<") == 2  # a scale bar on each LoRA picture (spacing known), none else
    with Image.open(files[0]) as im:
        pixels = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}
    assert set(colours.values()) <= pixels and (0, 255, 0) not in pixels  # the lowest seed's pictures
    assert (213, 94, 0) in pixels  # the legend in the PNGs' palette (Okabe-Ito vermillion)
    # overlays in two palettes: no grid (one legend cannot tell both), a warning naming them
    save_png(np.zeros((16, 24, 3), np.uint8), root / "mona" / "version_0" / "overlays" / "a.png", {})
    assert write_overlay_grids(runs, tmp_path / "out2") == []
    assert "different palettes" in caplog.text and "okabe-ito" in caplog.text


def test_long_method_names_are_cut_in_the_middle_for_grid_titles():
    assert short_title("CLIP (Mona)", 22) == "CLIP (Mona)"
    cut = short_title("OpenAI CLIP ViT-B-16 + Mona (ft.)", 22)
    assert cut == "OpenAI CLIP…Mona (ft.)" and len(cut) == 22
    assert short_title("OpenAI CLIP ViT-B-16 + Mona", 22) != short_title("OpenAI CLIP ViT-B-16 + Mona (ft.)", 22)


@pytest.mark.slow
def test_real_fit_and_test_in_the_sweep_layout_then_report(tmp_path):
    """The contract's logger options put a real run where the report reads it; names with and without sweep_run."""
    from pathlib import Path

    conf = Path(__file__).parent / "conf" / "segmentation_mona.yaml"
    run_dir = tmp_path / "sweep" / "table2" / "BUSI" / "clip_mona" / "seed_1"
    common = [
        f"--config={conf}",
        f"--data.init_args.root={tmp_path / 'data' / 'BUSI'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'sweep' / 'table2' / 'BUSI'}",
        "--trainer.logger.init_args.name=clip_mona",
        "--trainer.logger.init_args.version=seed_1",
        "--seed_everything=1",
    ]
    run_dir.mkdir(parents=True)
    info = {"table": "table2", "group": "segmentation", "method": "CLIP (Mona)", "dataset": "BUSI", "seed": 1}
    (run_dir / "sweep_run.json").write_text(json.dumps(info | {"manifest": "paper", "commands": []}))
    main(["fit", *common])
    main(["test", *common, f"--ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"])
    metrics = json.loads((run_dir / "results" / "test_metrics.json").read_text())
    out = tmp_path / "report"
    assert report([tmp_path / "sweep", "--output", out, "--grid-images", "0"]) == 0
    (row,) = read_csv(out / "table2.csv")
    assert row["method"] == "CLIP (Mona)" and float(row["BUSI_dice_mean"]) == metrics["dice"]
    (run_dir / "sweep_run.json").unlink()
    result = load_run(run_dir)  # the test's resolved config.yaml
    assert (result.method, result.dataset, result.seed) == ("usclip-test-vit (random init) + Mona", "BUSI", 1)


# --- runs trained from Python ----------------------------------------------------------------------------------------


def test_report_reads_a_run_trained_with_a_plain_lightning_trainer(tmp_path, capsys):
    """No config.yaml: the method, dataset and seed come from hparams.yaml and the checkpoint.

    Catches: a Python run refused (no config.yaml), the seed not read from the checkpoint, the dataset taken from
    another key than the DataModule's root, the task told from the wrong hyperparameter.
    """
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from usclip.data import SegmentationDataModule
    from usclip.tasks import SegmentationTask

    from .test_data import make_folder

    L.seed_everything(7)
    root = make_folder(tmp_path / "ln_1", n=12, size=(40, 56))
    task = SegmentationTask(
        model_name="usclip-test-vit", pretrained=None, adapter="lora", layers=[1, 3], image_size=32, embed_dim=8
    )
    dm = SegmentationDataModule(str(root), image_size=32, batch_size=4, augmentations={}, num_workers=0)
    logger = CSVLogger(tmp_path / "runs", name="my_python_run")
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=logger,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    trainer.test(task, datamodule=dm, ckpt_path="best", verbose=False)
    run_dir = tmp_path / "runs" / "my_python_run" / "version_0"
    assert not (run_dir / "config.yaml").exists() and (run_dir / "results" / "test_metrics.json").is_file()
    result = load_run(run_dir)
    assert (result.table, result.group, result.dataset, result.seed) == ("table2", "segmentation", "LN-1", 7)
    assert result.method == "usclip-test-vit (random init) + LoRA"
    assert load_run(run_dir, "name").method == "my_python_run"
    out = tmp_path / "report"
    assert report([tmp_path / "runs", "--output", out, "--grid-images", "0"]) == 0
    (row,) = read_csv(out / "table2.csv")
    metrics = json.loads((run_dir / "results" / "test_metrics.json").read_text())
    assert row["method"] == "usclip-test-vit (random init) + LoRA" and float(row["LN-1_dice_mean"]) == metrics["dice"]
    # without hparams.yaml the checkpoint alone still tells the task, method and dataset
    (run_dir / "hparams.yaml").unlink()
    assert load_run(run_dir) == result
