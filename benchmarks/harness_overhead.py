"""Harness overhead: one config through the bare engine and through `harness run`.

Both legs are fresh processes doing the same work (a one-arm, one-seed study of the
default tiny/digits config), alternated round by round so background load hits both; the
overhead is (harness wall - bare wall) / harness wall. The harness leg includes everything
it adds: CLI start, study validation, MLflow experiment and run, the worker process, metric
logging, Parquet tables, artifacts (the report is switched off; it is not per-run work).

    python -m benchmarks.harness_overhead [--steps 1500] [--rounds 3]

Target (DESIGN.md sec. 8): overhead at most 3% of a run's wall time.
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

import yaml

BARE = """
import json, sys, torch
torch.set_num_threads({threads})
from ddpm_engine import ExperimentConfig, NullRecorder, run_experiment
run_experiment(ExperimentConfig.from_dict(json.loads(sys.argv[1])), NullRecorder(), device="cpu")
"""


def timed(cmd: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    config = {"train": {"steps": args.steps}, "sample": {"num_samples": 64}}
    bare, harness = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
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
            for name, cmd in legs:
                seconds = timed(cmd, tmp)
                (bare if name == "bare" else harness).append(seconds)
                print(f"round {r}: {name:8s} {seconds:7.1f} s", flush=True)
    for r, (b, h) in enumerate(zip(bare, harness)):
        what = "fresh folder: MLflow creates its schema" if r == 0 else "existing MLflow store"
        print(f"round {r}: overhead {h - b:5.1f} s = {(h - b) / h:5.1%}  ({what})")
    b, h = statistics.median(bare), statistics.median(harness)
    print(f"bare engine  median {b:.1f} s")
    print(f"harness run  median {h:.1f} s")
    print(f"overhead     {h - b:.1f} s = {(h - b) / h:.1%} of the harness run's wall time (medians)")


if __name__ == "__main__":
    main()
