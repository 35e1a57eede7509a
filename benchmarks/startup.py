"""Start-up cost of CLI commands: wall and CPU seconds, and how many modules each one imports.

    python benchmarks/startup.py                       # this checkout
    python benchmarks/startup.py --baseline /path/to/an/older/checkout   # side by side, alternating

Each command runs `--repeats` times in a fresh interpreter (`python -m minigpt ...` with the tree's
src on PYTHONPATH); runs of the two trees alternate, so machine load hits both alike. CPU seconds
(user + system of the child) move less with load than wall seconds; the module count does not move
at all. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "info": ["info"], "info RUN": ["info", "{run}"]}
COUNT = ("import runpy, sys\nsys.argv = ['minigpt', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('minigpt', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "print(len(sys.modules), file=sys.stderr)")


def run_once(src: Path, argv: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minigpt", *argv], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def modules(src: Path, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", COUNT, *argv], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, help="another checkout to compare with")
    p.add_argument("--run", type=Path, default=ROOT / "tests" / "fixtures" / "run-0.1.0")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    trees = {"this": ROOT / "src"}
    if args.baseline:
        trees["baseline"] = args.baseline / "src"
    results: dict[str, dict] = {}
    for name, argv in COMMANDS.items():
        argv = [a.format(run=args.run) for a in argv]
        samples: dict[str, list[tuple[float, float]]] = {t: [] for t in trees}
        for _ in range(args.repeats):
            for tree, src in trees.items():  # alternate: load hits both trees alike
                samples[tree].append(run_once(src, argv))
        for tree, src in trees.items():
            walls, cpus = zip(*samples[tree])
            results.setdefault(name, {})[tree] = {
                "wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3),
                "modules": modules(src, argv)}
    for name, per in results.items():
        row = "  ".join(f"{t}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, {r['modules']} modules"
                        for t, r in per.items())
        print(f"minigpt {name:10s} {row}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
