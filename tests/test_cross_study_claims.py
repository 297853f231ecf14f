"""Two studies run at once that share a training train it once: the claim lives under the
results root, the second study waits for the first's claim, then adopts the finished key."""

import os
import subprocess
import sys
import threading
import time

import pandas as pd

from harness.runs.claims import KeyClaims, wait_until_free
from harness.study.plan import expand
from harness.study.spec import load_study

SHARED = """\
study: {name}
question: Is a shared training trained once?
base:
  model: {{preset: tiny, base_channels: 16, time_embed_dim: 32}}
  diffusion: {{T: 20}}
  train: {{steps: 240, batch_size: 32, log_every: 20, checkpoint_every: 60, warmup_steps: 2}}
  sample: {{num_samples: 8}}
  eval: {{probe_every: 120, probe_images: 16, drift_hist_steps: 5, quality: false}}
ablations:
  timesteps:
    T20: {{diffusion.T: 20}}
{extra}seeds: [0]
"""


def _start(cwd, name):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", f"{name}.yaml", "--no-report", "--workers", "1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_studies_at_once_train_their_shared_key_once(tmp_path):
    (tmp_path / "first.yaml").write_text(SHARED.format(name="first", extra=""))
    (tmp_path / "second.yaml").write_text(
        SHARED.format(name="second", extra="    T10: {diffusion.T: 10}\nbaseline: {timesteps: T20}\n")
    )
    shared_key = expand(load_study(tmp_path / "first.yaml"))[0].key
    first = _start(tmp_path, "first")
    claims = tmp_path / "results" / ".claims"
    deadline = time.monotonic() + 120
    while not (claims.is_dir() and any(claims.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = _start(tmp_path, "second")
    out_first, _ = first.communicate(timeout=900)
    out_second, _ = second.communicate(timeout=900)
    assert first.returncode == 0, out_first
    assert second.returncode == 0, out_second
    said = " ".join(out_second.split())
    # the held training is named with its holder's study; whether the second then waits
    # depends on which process ends first (it trains its own arm meanwhile), so not asserted
    assert "1 run(s) are being run by another harness process and are left to it: T20-s0" in said, said
    assert "(study first)" in said
    assert "reused 1 finished run(s) from other studies" in said
    row = pd.read_parquet(tmp_path / "results" / "second" / "runs" / f"{shared_key}.parquet").iloc[0]
    assert row["status"] == "finished"
    assert "reused from study first" in row["note"]  # adopted, not trained a second time


def test_one_process_holds_one_lock_per_training_and_others_see_its_study(tmp_path):
    (tmp_path / "s.yaml").write_text(
        SHARED.format(name="s", extra="    ddim: {sample.sampler: ddim, sample.steps: 5}\nbaseline: {timesteps: T20}\n")
    )
    specs = expand(load_study(tmp_path / "s.yaml"))
    assert len({s.train_key for s in specs}) == 1 and len(specs) == 2
    mine = KeyClaims(tmp_path, "s")
    got, others = mine.acquire(specs)
    assert got == specs and not others  # the second key of one training re-uses the lock
    mine.release(specs[0].key)  # still held for the other key of the same training
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from harness.runs.claims import KeyClaims; "
            "from harness.study.plan import expand; from harness.study.spec import load_study; "
            f"specs = expand(load_study(Path({str(tmp_path / 's.yaml')!r}))); "
            f"got, others = KeyClaims(Path({str(tmp_path)!r}), 'other').acquire(specs); "
            "print(len(got), others[0][1].study)",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.split() == ["0", "s"], probe.stdout + probe.stderr
    mine.release()


def test_waiting_for_another_studys_training_names_it_and_ends_when_it_is_released(tmp_path):
    (tmp_path / "s.yaml").write_text(SHARED.format(name="s", extra=""))
    specs = expand(load_study(tmp_path / "s.yaml"))
    holder = KeyClaims(tmp_path, "first")
    assert holder.acquire(specs)[0] == specs
    said: list[str] = []
    assert not wait_until_free(tmp_path, specs, said.append, poll=0.05, timeout=0.3)
    assert len(said) == 1 and said[0].startswith("waiting for 1 run(s) another study's process is training: pid")
    assert "(study first)" in said[0]
    releaser = threading.Timer(0.3, holder.release)
    releaser.start()
    try:
        assert wait_until_free(tmp_path, specs, said.append, poll=0.05, timeout=30)
    finally:
        releaser.join()
    assert len(said) == 2  # said once per wait, not once per poll
