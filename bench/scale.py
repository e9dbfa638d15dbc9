"""How the data pipeline grows from 5,000 to 50,000 scans: time and peak memory per stage, and the growth exponent.

Writes ``max(--sizes)`` small synthetic scans once (``write_synthetic_dataset``, 64 x 64 px by default; reused on
later runs), then one dataset folder per size holding the first N scans (hard links, so nothing is copied), and
measures each stage in a fresh process, so that each peak resident set size (``ru_maxrss`` from ``wait4``) is that
stage's own:

- ``import``: ``import usclip.data`` plus torch, the floor every stage starts from;
- ``setup``: indexing and the seeded group-aware 8:1:1 split at fit start (``SegmentationDataModule.setup("fit")``);
- ``setup_test_txt``: the same with a predefined ``test.txt`` (10 % of the ids; the rest is split 8:2);
- ``check``: ``usclip data check ROOT`` (every image and mask read);
- ``duplicates``: ``usclip data duplicates ROOT --output ...`` (exact all-pairs search, tiled);
- ``epoch``: setup plus one epoch of the train dataloader without the cache (``cache_mb: 0``);
- ``epoch_cache``: two epochs with the memory cache (default 1024 MB): the first fills it, the second reads it;
- ``predict``: ``usclip predict`` of every scan with a tiny checkpoint (``usclip-test-vit``, LoRA, one training
  step on 24 synthetic images), batch 32 as the CLI does.

Times are CPU seconds of the stage's process (user + system, from ``wait4``; inside the loader stages, of the
setup and of each epoch alone): on shared cores they move far less with other jobs than wall time does (wall
time is kept in ``OUT/results/<stage>_<N>.json``). The growth exponent is the least-squares slope of log(value) against
log(N): a linear stage gives 1.0, an ``N log N`` one about 1.1 over 5,000-50,000, a quadratic one 2.0. Memory
is given as the change of the peak from the first to the last size (the floor is the imported libraries). Whole
processes include a fixed start-up (imports, about 11 CPU s with torch), which flattens their exponents; the CPU
seconds per 1,000 more scans between consecutive sizes are free of it (constant for a linear stage, growing with
N for a quadratic one).

    python bench/scale.py          # 5,000, 15,000, 50,000; every stage; --out: usclip_scale in the temporary folder
    python bench/scale.py --out DIR --sizes 500 1000 --stages setup check
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("scale")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "conf" / "segmentation_lora.yaml"
STAGES = ("import", "setup", "setup_test_txt", "check", "duplicates", "epoch", "epoch_cache", "predict")


# ----------------------------------------------------------------------------------------------- child stages
def _child(stage: str, root: Path, image_size: int, batch_size: int) -> dict[str, float]:
    """Run one in-process stage; return its inner timings in seconds (the parent measures time and memory)."""
    import torch  # noqa: F401  (every stage pays for it: part of the floor)

    from usclip.data import SegmentationDataModule

    if stage == "import":
        return {}
    start = time.process_time()
    dm = SegmentationDataModule(
        str(root), image_size=image_size, batch_size=batch_size, num_workers=0, cache_mb=1024 if "cache" in stage else 0
    )
    dm.setup("fit")
    times = {"setup_s": time.process_time() - start, "train": len(dm.splits["train"])}  # CPU seconds
    for epoch in range(2 if stage == "epoch_cache" else 1 if stage.startswith("epoch") else 0):
        start, seen = time.process_time(), 0
        for batch in dm.train_dataloader():
            seen += batch["image"].shape[0]
        times[f"epoch{epoch + 1}_s"] = time.process_time() - start
        times["images_per_epoch"] = seen
    if dm.cache is not None:
        times["cache_mb"] = dm.cache._bytes / 2**20
    return times


# ----------------------------------------------------------------------------------------------- parent
def _run(args: list[str], cwd: Path) -> tuple[float, float, float, str]:
    """Run ``python ARGS`` in a fresh process; return (peak RSS in MiB, wall seconds, CPU seconds, stdout)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed with exit code {code}:\n{out[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other jobs on the shared cores
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start, cpu, out  # ru_maxrss is in KiB on Linux


def _link_subset(source: Path, target: Path, n: int, test_txt: bool) -> Path:
    """``target``: the first ``n`` scans of ``source`` (hard links), with labels/groups/boxes rows cut to match."""
    marker = target / ".complete"
    if marker.is_file():
        return target
    ids = [f"syn_{i:05d}" for i in range(n)]
    for sub in ("images", "masks"):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for sid in ids:
            dst = target / sub / f"{sid}.png"
            if not dst.exists():
                with contextlib.suppress(FileExistsError):  # another run of this script linked it meanwhile
                    os.link(source / sub / f"{sid}.png", dst)
    keep = set(ids)
    for name in ("labels.csv", "groups.csv", "boxes.csv"):
        lines = (source / name).read_text().splitlines(keepends=True)
        (target / name).write_text(lines[0] + "".join(x for x in lines[1:] if x.split(",", 1)[0] in keep))
    if test_txt:  # every 10th id: a predefined test set (TN3K style); the rest is split train:val
        (target / "test.txt").write_text("".join(f"{sid}\n" for sid in ids[::10]))
    marker.touch()
    return target


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _checkpoint(out: Path) -> Path:
    """A tiny segmentation checkpoint (one training step), trained once and reused."""
    run = out / "runs" / "segmentation_lora" / "version_0" / "checkpoints" / "last.ckpt"
    if not run.is_file():
        _run(["-m", "usclip", "fit", *_common(out), "--trainer.limit_train_batches=1"], cwd=out)
    return run


def _common(out: Path) -> list[str]:
    return [
        "--config",
        str(CONF),
        f"--data.init_args.root={out / 'train'}",
        f"--trainer.logger.init_args.save_dir={out / 'runs'}",
        f"--trainer.default_root_dir={out}",
    ]


def _measure(stage: str, root: Path, out: Path, n: int, image_size: int, batch_size: int) -> dict[str, float]:
    if stage == "check":
        peak, seconds, cpu, text = _run(["-m", "usclip", "data", "check", str(root)], cwd=out)
        if f"images: {n}" not in text:
            raise RuntimeError(f"usclip data check did not count {n} images:\n{text[:1000]}")
        return {"peak_mib": peak, "wall_s": seconds, "cpu_s": cpu}
    if stage == "duplicates":
        groups = out / f"duplicates_{n}.csv"
        peak, seconds, cpu, text = _run(
            ["-m", "usclip", "data", "duplicates", str(root), "--output", str(groups), "--overwrite"], cwd=out
        )
        pairs = float(text.split(" duplicate pairs")[0].split()[-1])  # "<N> images: <P> duplicate pairs, ..."
        return {"peak_mib": peak, "wall_s": seconds, "cpu_s": cpu, "pairs": pairs}
    if stage == "predict":
        name = f"predict_{n}"
        peak, seconds, cpu, _ = _run(
            [
                "-m",
                "usclip",
                "predict",
                *_common(out),
                f"--trainer.logger.init_args.name={name}",
                f"--ckpt_path={_checkpoint(out)}",
                f"--data.init_args.predict_root={root}",
                f"--data.init_args.batch_size={batch_size}",
            ],
            cwd=out,
        )
        written = max((out / "runs" / name).glob("version_*"), key=lambda p: p.stat().st_mtime)
        masks = sum(1 for _ in (written / "predictions" / "masks").iterdir())
        if masks != n:
            raise RuntimeError(f"{n} images but {masks} masks written in {written}")
        return {"peak_mib": peak, "wall_s": seconds, "cpu_s": cpu}
    child = [__file__, "--child", stage, "--root", str(root), "--image-size", str(image_size)]
    peak, seconds, cpu, text = _run([*child, "--batch-size", str(batch_size)], cwd=out)
    return {"peak_mib": peak, "wall_s": seconds, "cpu_s": cpu, **json.loads(text.strip().splitlines()[-1])}


def slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size): the growth exponent (nan when undefined)."""
    pts = [(math.log(n), math.log(v)) for n, v in zip(sizes, values, strict=True) if v > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")


def main(argv: list[str] | None = None) -> None:
    """Measure every stage at every size and print Markdown tables (figures also go to ``OUT/results/``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "usclip_scale",
        help="work folder, never the repo (default: usclip_scale in the system temporary folder)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 15000, 50000], help="numbers of scans")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--scan-size", type=int, default=64, help="side of the synthetic scans in pixels")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size of the loader stages")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--report-only", action="store_true", help="print the tables from OUT/results, measure nothing")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(_child(args.child, args.root, args.image_size, args.batch_size)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from usclip.data.synthetic import write_synthetic_dataset

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, made = out / "data", _read_json(out / "data" / "synthetic.json")
    enough = made is not None and made.get("size") == args.scan_size and made.get("num_samples", 0) >= max(args.sizes)
    if not (args.report_only or enough):
        write_synthetic_dataset(data, num_samples=max(args.sizes), size=args.scan_size)  # or reuse a larger one
    if not args.report_only:
        log.info("synthetic dataset ready in %.0f s: %s", time.perf_counter() - start, data)
    (out / "results").mkdir(exist_ok=True)  # one file per stage and size: runs over other stages can go side by side
    for n in [] if args.report_only else sorted(args.sizes):
        root = _link_subset(data, out / f"n{n}", n, test_txt=False)
        for stage in args.stages:
            where = _link_subset(data, out / f"n{n}_test_txt", n, test_txt=True) if stage == "setup_test_txt" else root
            load = os.getloadavg()[0]
            figures = _measure(stage, where, out, n, args.image_size, args.batch_size)
            figures["load"] = load
            (out / "results" / f"{stage}_{n}.json").write_text(json.dumps(figures, indent=1))
            log.info("%s, %d scans: %s", stage, n, {k: round(v, 2) for k, v in figures.items()})
    print(f"\nmachine: {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}")
    print(f"scans {args.scan_size} px, loader image_size {args.image_size}, batch {args.batch_size}, 0 workers\n")
    sizes = sorted(args.sizes)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for path in (out / "results").glob("*.json"):
        stage, n = path.stem.rsplit("_", 1)
        results.setdefault(stage, {})[n] = json.loads(path.read_text())
    head = " | ".join(f"{n:,} scans" for n in sizes)
    print(f"| stage | {head} | exponent: time | CPU s per 1,000 more scans | peak RSS, first to last size |")
    print("| --- |" + " ---: |" * (len(sizes) + 3))
    for stage in args.stages:
        rows = {n: results[stage][str(n)] for n in sizes if str(n) in results.get(stage, {})}
        for key in ("cpu_s", "setup_s", "epoch1_s", "epoch2_s"):
            got = [n for n in sizes if key in rows.get(n, {})]
            if not got:
                continue
            name = stage if key == "cpu_s" else f"{stage}: {key[:-2]}"
            cells = " | ".join(
                "not measured"
                if n not in got
                else f"{rows[n][key]:.1f} s / {rows[n]['peak_mib']:.0f} MiB"
                if key == "cpu_s"
                else f"{rows[n][key]:.2f} s"
                for n in sizes
            )
            mem = f"{rows[got[-1]]['peak_mib'] - rows[got[0]]['peak_mib']:+.0f} MiB" if key == "cpu_s" else ""
            # marginal cost between consecutive sizes: free of the start-up floor; constant when linear
            marginal = ", ".join(
                f"{1000 * (rows[b][key] - rows[a][key]) / (b - a):.2f}" for a, b in itertools.pairwise(got)
            )
            print(f"| {name} | {cells} | {slope(got, [rows[n][key] for n in got]):.2f} | {marginal} | {mem} |")


if __name__ == "__main__":
    main()
