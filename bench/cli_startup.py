"""Wall time of the `usclip` commands a new user types first (the console script, a fresh process each run).

    python bench/cli_startup.py                 # median of 5 runs per command
    python bench/cli_startup.py --repeats 9 --json out.json

Prints the median and the slowest run per command, the load average before and after, and the CPU's model and
flags (avx2 / avx512_bf16), since figures are compared only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    ["--help"],
    ["--version"],
    ["data", "--help"],
    ["report", "--help"],
    ["captions", "--help"],
    ["sweep", "--help"],
    ["configs"],
    ["fit", "--help"],
]


def cpu_summary() -> str:
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return "unknown CPU"
    text = info.read_text(errors="replace")
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(wanted) or 'none of avx2/avx512'}"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    script = shutil.which("usclip", path=str(Path(sys.executable).parent)) or shutil.which("usclip")
    base = [script] if script else [sys.executable, "-m", "usclip"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result: dict[str, object] = {"cpu": cpu_summary(), "load_before": os.getloadavg()[0], "command": base[0]}
    rows = {}
    for cmd in COMMANDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            proc = subprocess.run([*base, *cmd], capture_output=True, env=env, timeout=600)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise SystemExit(f"usclip {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
        rows[" ".join(cmd)] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
        print(f"usclip {' '.join(cmd):<18} median {statistics.median(times):6.2f} s   max {max(times):6.2f} s")
    result["load_after"] = os.getloadavg()[0]
    result["commands"] = rows
    print(f"{result['cpu']}; load average {result['load_before']:.1f} -> {result['load_after']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
