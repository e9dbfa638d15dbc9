"""One complete segmentation run of the paper config through the real CLI, its wall time split into phases.

The run is what ``usclip sweep paper`` runs for the BUSI cell of CLIP (Mona) (the configs of the chosen
``--protocol``, from the packaged manifest), on BUSI-sized synthetic data (647 images, generated at 256 px with
``usclip.data.synthetic`` before the clock starts), with random weights (``pretrained: null``: nothing downloads):
``usclip fit`` (all epochs of the protocol, validation and checkpoints included) and then ``usclip test`` of its
best checkpoint, each in its own process, as the sweep runs them. An overlay adds
``usclip.callbacks.PhaseTimer``, which writes timestamps beside the run; this script splits the wall time, from
the launch of ``usclip fit`` to the exit of ``usclip test``, into:

- ``startup``: from the launch to the first training batch, less the validation (sanity check) and data wait in
  between (imports, config parsing, model construction, data indexing and splits);
- ``data``: inside training epochs, waiting for the next batch of the loader (worker start-up included);
- ``train_steps``: ``on_train_batch_start`` to ``on_train_batch_end`` (forward, loss, backward, optimiser);
- ``validation``: every validation loop (sanity check included);
- ``checkpoint``: every ``trainer.save_checkpoint`` (best, last, mid-epoch);
- ``other``: loop bookkeeping between the above (epoch ends, logging) and the gap between the two processes;
- ``teardown``: from the end of fit to the exit of the ``usclip fit`` process;
- ``test``: the whole ``usclip test`` process (its start-up, loop and exit are in ``test_detail``).

The phases partition the wall time: they sum to it up to rounding (``phase_sum_s`` beside ``wall_s``).
``--loader-workers 0,1,2`` also measures the training loader alone (images/s over two epochs, same data and
augmentations) beside the step images/s of the run. Examples::

    python bench/paper_run.py --model tiny --epochs 1 --images 48 --precision 32-true    # CPU smoke run
    python bench/paper_run.py --epochs 100 --accelerator gpu                             # one GPU
    python bench/paper_run.py --protocol authors --epochs 1000 --accelerator gpu         # the release loop

Writes ``--out`` (JSON; default ``bench_out/paper_run/paper_run.json``) and keeps the data, the run folder and the
logs of both processes under ``--work`` (default: the folder of ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("bench.paper_run")

REPO = Path(__file__).resolve().parents[1]
#: BUSI with its 133 normal images left out, as the paper uses it (docs/reproduce.md, Table 1)
BUSI_IMAGES = 647
#: malignant share of those 647 images (docs/data.md)
BUSI_MALIGNANT = 0.325
#: the manifest cell that is run: table 2, BUSI, CLIP (Mona), seed 1
CELL = {"table": "table2", "dataset": "BUSI", "slug": "clip_mona", "seed": 1}
#: the phases of the split, in report order; they sum to the wall time
PHASES = ("startup", "data", "train_steps", "validation", "checkpoint", "other", "teardown", "test")
#: the tiny model of the tests: architecture, blocks read, head width, image side
TINY = {"model_name": "usclip-test-vit", "layers": [1, 3], "embed_dim": 16}
TINY_IMAGE_SIZE = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("usclip", "authors"), default="usclip", help="the sweep's protocol")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the protocol's)")
    p.add_argument("--images", type=int, default=BUSI_IMAGES, help="synthetic images (BUSI: 647)")
    p.add_argument("--image-px", type=int, default=256, help="side of the generated images")
    p.add_argument("--model", default="ViT-B-16", help="ViT-B-16 (random weights) or 'tiny' (the test model)")
    p.add_argument("--precision", default=None, help="trainer.precision (default: the protocol's)")
    p.add_argument("--accelerator", default="auto", help="trainer.accelerator (cpu, gpu, auto)")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the config's, 32)")
    p.add_argument("--num-workers", default=None, help="data.num_workers (default: the config's, auto)")
    p.add_argument("--sync-cuda", action="store_true", help="synchronise CUDA at each phase end (exact split)")
    p.add_argument("--loader-workers", default="", help="also time the loader alone with these workers: '0,1,2'")
    p.add_argument("--no-test", action="store_true", help="fit only")
    p.add_argument("--out", default="bench_out/paper_run/paper_run.json", help="the JSON written")
    p.add_argument("--work", default=None, help="data, run folder and logs (default: the folder of --out)")
    args = p.parse_args(argv)
    for name in ("epochs", "images", "image_px", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def paper_configs(protocol: str) -> list[str]:
    """The ``--config`` files the sweep passes for :data:`CELL` under ``protocol`` (packaged manifest)."""
    from usclip.packaged_configs import resolve_config
    from usclip.reproduce.manifest import expand_runs, load_manifest

    manifest = load_manifest(REPO / "usclip" / "reproduce" / "paper.yaml")
    for run in expand_runs(manifest, protocol=protocol):
        if (run.table, run.dataset, run.slug, run.seed) == tuple(CELL.values()):
            return [str(REPO / resolve_config(c, REPO)) for c in run.configs]
    raise LookupError(f"the paper manifest has no run {CELL} under protocol {protocol!r}")


def composed(configs: list[str], section: str) -> dict[str, Any]:
    """``section`` of the configs merged in order (``init_args`` merged one level deep, as jsonargparse does)."""
    out: dict[str, Any] = {}
    for path in configs:
        data = yaml.safe_load(Path(path).read_text()) or {}
        part = data.get(section) or {}
        for key, value in part.items():
            if key == "init_args" and isinstance(value, dict):
                out.setdefault("init_args", {}).update(value)
            else:
                out[key] = value
    return out


def overlay(args: argparse.Namespace, root: Path, epochs: int) -> dict[str, Any]:
    """The config composed last: random weights, the data, the length, the timer (the sweep's configs stay)."""
    trainer: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": args.accelerator,
        "enable_progress_bar": False,
        "callbacks": [{"class_path": "usclip.callbacks.PhaseTimer", "init_args": {"synchronize": args.sync_cuda}}],
    }
    if args.precision is not None:
        trainer["precision"] = args.precision
    # random weights, but checkpoints without the frozen backbone, as a pretrained run writes them (the test
    # process rebuilds the same random backbone from the seed, which the checkpoint's fingerprint checks)
    model: dict[str, Any] = {"pretrained": None, "save_frozen_backbone": False}
    data: dict[str, Any] = {"root": str(root)}
    if args.model == "tiny":
        model |= TINY
        data["image_size"] = TINY_IMAGE_SIZE
    else:
        model["model_name"] = args.model
    if args.batch_size is not None:
        data["batch_size"] = args.batch_size
    if args.num_workers is not None:
        data["num_workers"] = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    return {"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}}


def split_phases(events: list[list[Any]], spawn: float, exit_time: float) -> dict[str, float]:
    """Split ``[spawn, exit_time]`` of one fit process into :data:`PHASES` from ``PhaseTimer`` events.

    Walks the events in order with a stack of open phases: the time up to each event belongs to the innermost
    open phase (a checkpoint written inside a validation is checkpoint time, not validation time). Inside an
    epoch, time that ends at a batch start is data wait, other time is bookkeeping. With nothing open: start-up
    before the first training batch, teardown after the ``teardown`` mark, bookkeeping in between.

    Raises:
        ValueError: for an ``end`` without its ``begin`` or events outside ``[spawn, exit_time]``.
    """
    out = dict.fromkeys(PHASES, 0.0)
    owner = {"train_step": "train_steps", "validation": "validation", "checkpoint": "checkpoint", "test": "test"}
    stack: list[str] = []
    previous = spawn
    stepped = tore_down = False
    for name, kind, t in events:
        if not spawn - 1e-3 <= t <= exit_time + 1e-3:
            raise ValueError(f"event {name} {kind} at {t} lies outside the process [{spawn}, {exit_time}]")
        gap = t - previous
        if stack and stack[-1] == "epoch":
            out["data" if (name, kind) == ("train_step", "begin") else "other"] += gap
        elif stack:
            out[owner[stack[-1]]] += gap
        else:
            out["teardown" if tore_down else "other" if stepped else "startup"] += gap
        if kind == "begin":
            stack.append(name)
            stepped = stepped or name == "train_step"
        elif kind == "end":
            if not stack or stack[-1] != name:
                raise ValueError(f"event {name} end at {t} closes {stack[-1] if stack else 'nothing'}")
            stack.pop()
        elif name == "teardown":
            tore_down = True
        previous = t
    out["teardown" if tore_down or not stepped else "other"] += exit_time - previous
    return out


def run_command(argv: list[str], log_file: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``argv`` from the repository root with output to ``log_file``; return (launch, exit) wall times."""
    with log_file.open("w") as handle:
        start = time.time()
        proc = subprocess.run(argv, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
        end = time.time()
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited with {proc.returncode}; end of {log_file}:\n{tail}")
    return start, end


def loader_rate(configs: list[str], over: dict[str, Any], workers: int, epochs: int = 2) -> dict[str, Any]:
    """Images/s of the training loader alone (same data settings as the run) with ``workers`` workers, per epoch."""
    from usclip.data import SegmentationDataModule

    init = composed([*configs], "data").get("init_args", {}) | over["data"]["init_args"]
    init = {k: v for k, v in init.items() if k != "synthetic"} | {"num_workers": workers}
    dm = SegmentationDataModule(**init)
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += int(batch["image"].shape[0])
        rates.append(images / (time.perf_counter() - start))
    return {"workers": workers, "images_per_epoch": images, "images_per_s_by_epoch": [round(r, 1) for r in rates]}


def cpu_flags() -> str:
    """The CPU model and its matrix flags (avx512f, avx512_bf16, amx_*) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f in ("avx512f", "avx512_bf16") or f.startswith("amx")]
    return f"{model}; flags: {' '.join(wanted) or 'no avx512f/avx512_bf16/amx'}"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.parent
    work.mkdir(parents=True, exist_ok=True)
    configs = paper_configs(args.protocol)
    trainer_cfg = composed(configs, "trainer")
    epochs = args.epochs or int(trainer_cfg["max_epochs"])

    from usclip.data.synthetic import write_synthetic_dataset

    root = work / "data"
    t0 = time.perf_counter()
    write_synthetic_dataset(root, num_samples=args.images, size=args.image_px, malignant_fraction=BUSI_MALIGNANT)
    generation_s = time.perf_counter() - t0

    over = overlay(args, root, epochs)
    overlay_path = work / "overlay.yaml"
    overlay_path.write_text(yaml.safe_dump(over, sort_keys=False))
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # a fresh run folder: no resume, no version suffix
    base = [a for c in (*configs, str(overlay_path)) for a in ("--config", c)]
    base += ["--seed_everything", str(CELL["seed"]), "--trainer.logger.init_args.save_dir", str(runs)]
    base += ["--trainer.logger.init_args.name", str(CELL["slug"]), "--trainer.logger.init_args.version", "seed_1"]
    run_dir = runs / str(CELL["slug"]) / "seed_1"
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    python = [sys.executable, "-m", "usclip"]

    log.info("usclip fit: %s, %d epochs, %d images (logs in %s)", args.protocol, epochs, args.images, work)
    fit_start, fit_end = run_command([*python, "fit", *base], work / "fit.log", env)
    fit = json.loads((run_dir / "results" / "phases_fit.json").read_text())
    phases = split_phases(fit["events"], fit_start, fit_end)
    test_detail: dict[str, float] = {}
    end = fit_end
    if not args.no_test:
        ckpt = run_dir / "checkpoints" / "best.ckpt"
        test_start, end = run_command([*python, "test", *base, "--ckpt_path", str(ckpt)], work / "test.log", env)
        test = json.loads((run_dir / "results" / "phases_test.json").read_text())
        detail = split_phases(test["events"], test_start, end)
        loop = detail.pop("test")
        test_detail = {"startup": detail["startup"], "loop": loop, "exit": sum(detail.values()) - detail["startup"]}
        phases["other"] += test_start - fit_end  # between the two processes
        phases["test"] = end - test_start
    wall = end - fit_start
    steps = sum(1 for e in fit["events"] if e[:2] == ["train_step", "begin"])
    validations = sum(1 for e in fit["events"] if e[:2] == ["validation", "begin"])
    first_batch = next(e[2] for e in fit["events"] if e[:2] == ["train_step", "begin"])
    result: dict[str, Any] = {
        "bench": "paper_run",
        "protocol": args.protocol,
        "configs": [str(Path(c).relative_to(REPO)) if Path(c).is_relative_to(REPO) else c for c in configs],
        "overlay": over,
        "epochs": epochs,
        "images": args.images,
        "image_px": args.image_px,
        "model": args.model,
        "precision": args.precision or trainer_cfg.get("precision"),
        "accelerator": args.accelerator,
        "wall_s": round(wall, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "phase_sum_s": round(sum(phases.values()), 3),
        "test_detail_s": {k: round(v, 3) for k, v in test_detail.items()},
        "to_first_batch_s": round(first_batch - fit_start, 3),
        "fit_wall_s": round(fit_end - fit_start, 3),
        "train_steps": steps,
        "validations": validations,
        "checkpoint_writes": sum(1 for e in fit["events"] if e[:2] == ["checkpoint", "begin"]),
        "train_images": fit["train_images"],
        "validation_images": fit["validation_images"],
        "step_images_per_s": round(fit["train_images"] / phases["train_steps"], 2) if phases["train_steps"] else None,
        "loader_wait_images_per_s": round(fit["train_images"] / phases["data"], 1) if phases["data"] else None,
        "data_generation_s": round(generation_s, 3),
        "machine": machine(),
        "run_dir": str(run_dir),
    }
    workers = [int(w) for w in args.loader_workers.split(",") if w.strip()]
    if workers:
        result["loader"] = [loader_rate(configs, over, w) for w in workers]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "phases_s", "step_images_per_s")}))
    return result


if __name__ == "__main__":
    main()
