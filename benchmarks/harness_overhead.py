"""Harness overhead: one config through the bare engine and through `harness run`.

Both legs are fresh processes doing the same work (a one-arm, one-seed study of the
default tiny/digits config), alternated round by round so background load hits both; the
overhead is (harness wall - bare wall) / harness wall. The harness leg includes everything
it adds: CLI start, study validation, MLflow experiment and run, the worker process, metric
logging, Parquet tables, artifacts (the report is switched off; it is not per-run work).

Wall times on a shared 2-core machine drift by +-10% between consecutive runs, so each leg's
wall is also split into the engine's own time (run_experiment's clock) and the time outside
it: the difference of the outside parts is what the harness adds, nearly free of that drift.

    python -m benchmarks.harness_overhead [--steps 1500] [--rounds 3]

Target (docs/design.md, "Targets"): overhead at most 3% of a run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

BARE = """
import json, sys, torch
torch.set_num_threads({threads})
from ddpm_engine import ExperimentConfig, MemoryRecorder, run_experiment
result = run_experiment(ExperimentConfig.from_dict(json.loads(sys.argv[1])), MemoryRecorder(), device="cpu")
print(json.dumps(result.summary))
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start, proc.stdout


def engine_seconds(results: Path, study: str) -> float:
    """The engine's own wall time (run_experiment, as the `runs` table records it)."""
    table = pq.read_table(next((results / study / "runs").glob("*.parquet")), columns=["seconds"])
    return float(table.column("seconds")[0].as_py())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    config = {"train": {"steps": args.steps}, "sample": {"num_samples": 64}}
    rows = []  # per round: {leg: (wall, engine)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # untimed: the first process to load torch and the data pays for a cold page cache
        warm = {"train": {"steps": 10}, "sample": {"num_samples": 4}, "eval": {"quality": False}}
        timed([sys.executable, "-c", BARE.format(threads=threads), json.dumps(warm)], tmp)
        for r in range(args.rounds):
            study = {"study": f"overhead{r}", "question": "How much does the harness add?", "base": config}
            path = tmp / f"overhead{r}.yaml"
            path.write_text(yaml.safe_dump(study))
            legs = [
                ("bare", [sys.executable, "-c", BARE.format(threads=threads), json.dumps(config)]),
                ("harness", [sys.executable, "-m", "harness.cli", "run", str(path), "--no-report"]),
            ]
            if r % 2:
                legs.reverse()
            row = {}
            for name, cmd in legs:
                wall, out = timed(cmd, tmp)
                engine = (
                    json.loads(out.strip().splitlines()[-1])["seconds"]
                    if name == "bare"
                    else engine_seconds(tmp / "results", study["study"])
                )
                row[name] = (wall, engine)
                print(
                    f"round {r}: {name:8s} wall {wall:7.1f} s, engine {engine:7.1f} s, outside the engine {wall - engine:5.1f} s",
                    flush=True,
                )
            rows.append(row)
    print()
    for r, row in enumerate(rows):
        (bw, be), (hw, he) = row["bare"], row["harness"]
        what = "fresh folder: MLflow creates its schema" if r == 0 else "existing MLflow store"
        print(
            f"round {r}: wall overhead {hw - bw:+6.1f} s = {(hw - bw) / hw:+6.1%}; added outside the engine "
            f"{(hw - he) - (bw - be):+5.1f} s; engine time harness/bare {he / be:.3f}  ({what})"
        )
    median = statistics.median
    bare_wall, harness_wall = median(r["bare"][0] for r in rows), median(r["harness"][0] for r in rows)
    added = median((r["harness"][0] - r["harness"][1]) - (r["bare"][0] - r["bare"][1]) for r in rows)
    engine_ratio = median(r["harness"][1] / r["bare"][1] for r in rows)
    print(f"bare engine  median wall {bare_wall:.1f} s")
    print(f"harness run  median wall {harness_wall:.1f} s")
    print(
        f"overhead     {harness_wall - bare_wall:+.1f} s = {(harness_wall - bare_wall) / harness_wall:+.1%} of the harness run's wall time (medians)"
    )
    print(
        f"  of which outside the engine (start, MLflow, tables, artifacts): {added:+.1f} s = {added / harness_wall:+.1%} (median of rounds)"
    )
    print(
        f"  and the engine's own time under the harness vs bare: x{engine_ratio:.3f} (median of rounds; machine noise shows here)"
    )


if __name__ == "__main__":
    main()
