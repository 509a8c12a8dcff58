"""Interpreter start-up with and without megatron-adamc's start-up hook, side by side.

Usage: ``python benchmarks/autoload_startup.py [--rounds 30] [--workdir DIR]``

Two venvs hold the same wheel install of this checkout (built as ``tests/workers/autoload_venv.py`` does): one as
installed, one with the two start-up files (``megatron_adamc_autoload.pth``/``.start``) deleted. Each case runs a
fresh interpreter in both, alternating, ``--rounds`` times (a drift of a shared machine hits both alike); the table
gives the median CPU time (user + system, of the child) and the median wall time:

- ``-c pass``: what every Python process pays (the ``.pth`` line, importing ``megatron_adamc.autoload``, the finder);
- ``-c "import torch"``: about 1,000 imports, each of which asks the finder first;
- ``-c "import deepspeed"``: where the hook fires and ``register()`` runs (the price of AdamC being there).

It also prints the hook's own share: the median microseconds of its two modules in ``python -X importtime -c pass``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from workers.autoload_venv import STARTUP_FILES, clean_env, installed_venv, site_packages, venv_python  # noqa: E402

CASES = {"-c pass": "pass", '-c "import torch"': "import torch", '-c "import deepspeed"': "import deepspeed"}
ROUNDS_SCALE = {"-c pass": 1.0, '-c "import torch"': 0.34, '-c "import deepspeed"': 0.17}


def timed(python: Path, code: str) -> tuple[float, float]:
    """(CPU seconds of the child, wall seconds) of one fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, capture_output=True, env=clean_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def hook_import_us(python: Path, rounds: int) -> float:
    """Median over ``rounds`` runs of the self times of the hook's modules in ``python -X importtime -c pass``."""
    totals = []
    for _ in range(rounds):
        cmd = [python, "-X", "importtime", "-c", "pass"]
        stderr = subprocess.run(cmd, capture_output=True, text=True, env=clean_env()).stderr
        rows = [line.split("|") for line in stderr.splitlines() if "megatron_adamc" in line]
        totals.append(sum(int(row[0].split(":")[1]) for row in rows))
    return statistics.median(totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autoload-bench-"))
    with_hook = installed_venv(workdir / "with", "wheel")
    without = installed_venv(workdir / "without", "wheel")
    for name in STARTUP_FILES:
        (site_packages(without) / name).unlink(missing_ok=True)
    pythons = {"without hook": venv_python(without), "with hook": venv_python(with_hook)}

    rows = []
    for case, code in CASES.items():
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in pythons}
        for _ in range(max(3, round(args.rounds * ROUNDS_SCALE[case]))):
            for label, python in pythons.items():
                samples[label].append(timed(python, code))
        cpu = {k: statistics.median(s[0] for s in v) * 1e3 for k, v in samples.items()}
        wall = {k: statistics.median(s[1] for s in v) * 1e3 for k, v in samples.items()}
        rows.append((case, len(samples["with hook"]), cpu, wall))

    print("| case | runs | CPU without (ms) | CPU with (ms) | with/without | wall without (ms) | wall with (ms) |")
    print("|---|---|---|---|---|---|---|")
    for case, runs, cpu, wall in rows:
        ratio = cpu["with hook"] / cpu["without hook"]
        print(
            f"| {case} | {runs} | {cpu['without hook']:.1f} | {cpu['with hook']:.1f} | {ratio:.3f} "
            f"| {wall['without hook']:.1f} | {wall['with hook']:.1f} |"
        )
    us = hook_import_us(pythons["with hook"], args.rounds)
    print(f"\nthe hook's two modules in `python -X importtime -c pass`: {us:.0f} us (median of {args.rounds})")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
