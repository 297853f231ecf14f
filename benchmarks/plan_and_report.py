"""How long `harness plan` takes on a 10,000-run study and `harness report` on a 500-run one.

The plan study is a factorial of four axes (10 x 10 x 10 x 10 levels of cheap keys) with one
seed; `harness plan --no-measure --no-check` runs through the real CLI in a subprocess (its
wall time includes the interpreter start). The report study is synthetic: 50 arms x 10 seeds
of hand-made Parquet tables with the shapes a digits run writes (per_t over 39 t at 4 probes,
drift over 1,001 steps, drift_hist, train, quality), built with `build_report`.

    python -m benchmarks.plan_and_report [--runs 10000] [--report-arms 50] [--report-seeds 10]

Targets (issue 16): plan of 10,000 runs under 2 s, report of 500 runs under 60 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ddpm_engine.metrics import PER_RUN, TABLES


def plan_seconds(runs: int, folder: Path) -> float:
    side = round(runs ** (1 / 4))
    axes = {
        "lr": {f"lr{i}": {"train.lr": 1e-4 * (i + 1)} for i in range(side)},
        "warmup": {f"w{i}": {"train.warmup_steps": i + 1} for i in range(side)},
        "ema": {f"e{i}": {"train.ema_decay": 0.9 + i / (10 * side)} for i in range(side)},
        "clip": {f"c{i}": {"train.grad_clip": 0.5 + i} for i in range(side)},
    }
    study = folder / "big.yaml"
    study.write_text(json.dumps({"study": "big", "question": "How fast is plan?", "ablations": axes, "seeds": [0]}))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "plan", str(study), "--no-measure", "--no-check"],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return seconds, side**4


def synthetic_study(root: Path, arms: int, seeds: int) -> None:
    from harness.store.tables import write_table

    rng = np.random.default_rng(0)
    study = "synthetic"
    names = [f"arm{i}" for i in range(arms)]
    keys = {(a, s): f"{i * seeds + s:012x}" for i, a in enumerate(names) for s in range(seeds)}
    (root / study).mkdir(parents=True)
    (root / study / "study.json").write_text(
        json.dumps(
            {
                "study": study,
                "question": "How fast is report?",
                "design": "one_at_a_time",
                "axes": {"v": names},
                "baseline": {"v": names[0]},
                "baseline_arm": names[0],
                "seeds": list(range(seeds)),
                "arms": [{"arm": a, "levels": {"v": a}, "overrides": {}} for a in names],
                "runs": [{"run_key": k, "arm": a, "seed": s} for (a, s), k in keys.items()],
            }
        )
    )
    ts = np.unique(np.geomspace(1, 1000, 39).round().astype(int))
    for (arm, seed), key in keys.items():
        write_table(
            root,
            study,
            "runs",
            key,
            pd.DataFrame(
                [
                    {
                        "study": study,
                        "arm": arm,
                        "seed": seed,
                        "v": arm,
                        "status": "finished",
                        "error": "",
                        "mlflow_run_id": "",
                        "params": 5e5,
                        "seconds": 300.0,
                        "config_json": "",
                    }
                ]
            ),
        )
        per_t = pd.DataFrame(
            [
                {c: rng.random() for c in TABLES["per_t"]} | {"step": step, "t": t, "best_ref_denoiser": "pixelwise"}
                for step in (500, 1000, 1500, 2000)
                for t in ts
            ]
        )
        write_table(root, study, "per_t", key, per_t)
        drift = pd.DataFrame({c: rng.random(1001) for c in TABLES["drift"]} | {"t": np.arange(1000, -1, -1)})
        write_table(root, study, "drift", key, drift)
        hist = pd.DataFrame(
            [
                {"t": t, "bin_lo": b / 64, "bin_hi": (b + 1) / 64, "count": 1, "ref_count": 1}
                for t in range(0, 1001, 20)
                for b in range(64)
            ]
        )
        write_table(root, study, "drift_hist", key, hist)
        write_table(
            root,
            study,
            "train",
            key,
            pd.DataFrame(
                {
                    "step": np.arange(100, 2001, 100),
                    "loss": rng.random(20),
                    "lr": 1e-3,
                    "grad_norm": 1.0,
                    "images_per_s": 900.0,
                }
            ),
        )
        write_table(root, study, "quality", key, pd.DataFrame([{m: rng.random() for m in PER_RUN}]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--report-arms", type=int, default=50)
    parser.add_argument("--report-seeds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seconds, runs = plan_seconds(args.runs, folder)
        print(f"harness plan of {runs:,} runs: {seconds:.1f} s (target under 2 s)")
        synthetic_study(folder / "results", args.report_arms, args.report_seeds)
        from harness.report import build_report

        start = time.perf_counter()
        build_report("synthetic", folder / "results", folder / "reports")
        n = args.report_arms * args.report_seeds
        print(f"harness report of {n} runs: {time.perf_counter() - start:.1f} s (target under 60 s)")


if __name__ == "__main__":
    main()
