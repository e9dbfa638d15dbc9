"""Run ``bench/train_step.py`` over a set of configurations (one fresh process each) and print a Markdown table.

    python bench/train_step_table.py                 # the table of docs/benchmarks.md (about 15 min on 2 cores)
    python bench/train_step_table.py --only scaling  # batch size and image size rows only
    python bench/train_step_table.py --out results.json

Each row: the configuration's flags, images/s, seconds per step, peak RSS, GFLOP per image, achieved GFLOP/s
and the fraction of the matmul peak measured in that same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "train_step.py"

GROUPS: dict[str, list[list[str]]] = {
    "headline": [
        [],  # Mona after the MLP, blocks 0-9, segmentation, batch 8, 224 px, fp32
        ["--precision", "bf16"],
        ["--grad-checkpointing"],
        ["--adapter", "lora"],
        ["--adapter", "none"],
        ["--task", "classification"],
    ],
    "scaling": [
        ["--batch-size", "4"],
        ["--batch-size", "16"],
        ["--image-size", "160"],
        ["--image-size", "288"],
    ],
    "predict": [
        ["--mode", "predict", "--adapter", "none"],
        ["--mode", "predict", "--adapter", "lora", "--merge", "--against-frozen"],
        ["--mode", "predict", "--adapter", "lora"],
        ["--mode", "predict", "--adapter", "mona"],
        ["--mode", "predict", "--adapter", "none", "--precision", "bf16"],
    ],
    "compile": [["--compile"]],
}


def run(flags: list[str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, str(BENCH), *flags, *extra, "--json", str(out)], check=True)
        result = json.loads(out.read_text())
    result["flags"] = " ".join(flags) or "(defaults)"
    return result


def table(results: list[dict]) -> str:
    head = "| flags | img/s | s/step | peak RSS GB | GFLOP/img | GFLOP/s | of peak (peak GFLOP/s) |"
    lines = [head, "|" + "---|" * 7]
    notes = []
    for r in results:
        lines.append(
            f"| `{r['flags']}` | {r['images_per_s']:.2f} | {r['seconds_per_step']:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{r['gflop_per_image']:.1f} | {r['achieved_gflops']:.0f} | "
            f"{100 * r['fraction_of_peak']:.0f} % ({r['matmul_peak_gflops']:.0f}) |"
        )
        if "time_vs_frozen" in r:
            notes.append(
                f"`{r['flags']}`: time / time of the tower without adapters, alternating blocks in one process = "
                f"{r['time_vs_frozen']:.3f} (blocks: {r['time_vs_frozen_per_block']}; frozen "
                f"{r['frozen_images_per_s']:.2f} img/s)"
            )
    return "\n".join([*lines, "", *notes])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(GROUPS), default=None, help="groups to run (default: all)")
    p.add_argument("--out", default=None, help="also write every result as JSON here")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every run, after --")
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    results = [run(flags, extra) for group in (args.only or list(GROUPS)) for flags in GROUPS[group]]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    sys.stdout.write(table(results) + "\n")


if __name__ == "__main__":
    main()
