"""``usclip export``: a trained run as a shareable folder, ONNX or ``torch.export`` files, pushed to the Hub.

``usclip export runs/busi_seg/version_0 --out busi_seg_model`` writes the folder a colleague loads with
``usclip.sharing.load_pretrained("busi_seg_model")``; ``--format onnx torch-export`` adds ``model.onnx`` and
``model.pt2``; ``--push-to-hub owner/name`` uploads the folder. See docs/sharing.md. ``--help`` imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

FORMATS = ("folder", "onnx", "torch-export")
ONNX_FILE = "model.onnx"
TORCH_EXPORT_FILE = "model.pt2"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad arguments: one ``usclip: error:`` line (argparse prints the usage first)."""
        self.exit(2, f"usclip: error: export: {message} (usclip export --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``usclip export`` argument parser."""
    parser = _Parser(
        prog="usclip export",
        description="Save a trained run as a folder a colleague loads in one line (usclip.sharing.load_pretrained), "
        "export its inference network as ONNX or torch.export, and push the folder to the Hugging Face Hub. "
        "Docs: docs/sharing.md.",
    )
    parser.add_argument(
        "source",
        metavar="RUN_DIR|CKPT|FOLDER",
        help="a run directory (its checkpoints/best.ckpt), a .ckpt file, or a folder written by usclip export",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=FORMATS,
        default=["folder"],
        metavar="FORMAT",
        help="folder (weights, config, preprocessing, model card; the default), onnx (DIR/model.onnx), torch-export "
        "(DIR/model.pt2); several may be given",
    )
    parser.add_argument(
        "--metrics",
        metavar="JSON",
        help="the test metrics shown on the model card (default: RUN_DIR/results/test_metrics.json when present)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo (owner/name)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument(
        "--backbone",
        choices=("auto", "always", "never"),
        default="auto",
        help="store the frozen backbone in the folder: auto (only when no tag or Hub id can rebuild it: random "
        "weights, a local file), always (a self-contained folder), never",
    )
    parser.add_argument(
        "--onnx-exporter", choices=("dynamo", "torchscript"), default="dynamo", help="torch.onnx.export's exporter"
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size of the exports (default: any)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="run the ONNX file with onnxruntime on random inputs and print its largest difference from PyTorch",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same names in DIR")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and written")
    return parser


def _load(source: str) -> tuple[Any, dict[str, Any]]:
    from usclip.sharing.folder import load_pretrained, load_run
    from usclip.sharing.layout import CONFIG_FILE

    path = Path(source).expanduser()
    if source.startswith("hf-hub:") or (path.is_dir() and (path / CONFIG_FILE).is_file()):
        return load_pretrained(source), {"test_metrics": None}
    return load_run(path)


def run(args: argparse.Namespace) -> int:
    """Export as ``args`` say; returns the exit code."""
    from usclip.sharing import export_onnx, export_torch, push_to_hub, save_pretrained
    from usclip.sharing.export import export_program
    from usclip.sharing.hub import HUB_PREFIX
    from usclip.sharing.layout import CONFIG_FILE, PREPROCESSING_FILE, SharingError

    out = Path(args.out).expanduser()
    formats = list(dict.fromkeys(args.format))
    if args.push_to_hub and "folder" not in formats and not (out / CONFIG_FILE).is_file():
        raise SharingError("--push-to-hub uploads the folder: add --format folder (with any other formats)")
    if args.push_to_hub and args.push_to_hub.removeprefix(HUB_PREFIX).count("/") != 1:
        raise SharingError(f"--push-to-hub {args.push_to_hub!r}: expected owner/name")
    task, info = _load(args.source)
    if args.metrics:
        metrics_file = Path(args.metrics).expanduser()
        if not metrics_file.is_file():
            raise SharingError(f"--metrics {args.metrics!r} does not exist: expected a test_metrics.json file")
        info["test_metrics"] = json.loads(metrics_file.read_text())
    written: list[Path] = []
    if "folder" in formats:
        repo = args.push_to_hub.removeprefix(HUB_PREFIX) if args.push_to_hub else None
        save_pretrained(
            task,
            out,
            backbone=args.backbone,
            overwrite=args.overwrite,
            model_id=repo,
            run_info=info,
        )
        written.append(out)
    else:  # an exported model is used with its preprocessing
        from usclip._io import write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / PREPROCESSING_FILE, json.dumps(task.preprocessing.to_dict(), indent=2) + "\n")
        written.append(out / PREPROCESSING_FILE)
    dynamic = not args.static_batch
    program = None
    if "torch-export" in formats and "onnx" in formats and args.onnx_exporter == "dynamo":
        program = export_program(task, dynamic_batch=dynamic)  # traced once for both files
    if "onnx" in formats:
        onnx_file = export_onnx(
            task,
            out / ONNX_FILE,
            exporter=args.onnx_exporter,
            opset=args.opset,
            dynamic_batch=dynamic,
            overwrite=args.overwrite,
            program=program,
        )
        written.append(onnx_file)
        if args.check:
            from usclip.sharing.export import InferenceModel, onnx_max_difference

            images = InferenceModel(task).example_input(3 if dynamic else 2)
            diff = onnx_max_difference(task, onnx_file, images)
            print(f"onnxruntime vs PyTorch: largest logit difference {diff:.2e} ({images.shape[0]} random images)")
    if "torch-export" in formats:
        written.append(
            export_torch(
                task, out / TORCH_EXPORT_FILE, dynamic_batch=dynamic, overwrite=args.overwrite, program=program
            )
        )
    for path in written:
        print(f"wrote {path}")
    if args.push_to_hub:
        commit = push_to_hub(out, args.push_to_hub, private=args.private or None)
        print(f"pushed {out} to {getattr(commit, 'commit_url', args.push_to_hub)}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run ``usclip export``; returns the exit code."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except ModuleNotFoundError as err:
        print(
            f"usclip: error: export needs {err.name}, which is not installed: pip install 'usclip[export]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        if os.environ.get("USCLIP_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split())
        print(f"usclip: error: {message}", file=sys.stderr)
        return 2
