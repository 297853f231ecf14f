"""Threads per CPU slot: two 1-thread runs side by side against 2-thread runs one after another.

`harness run` on a CPU starts one slot per core, each with one torch thread, rather than
fewer slots with more threads (harness.launch.slots). This measures the choice on the
engine's real training step (benchmarks.engine_step's `engine_step`, the tiny UNet): the
same work, 2 x N steps, done

  side by side: two processes at once, 1 thread each, N steps each (the loops start together
                at an agreed instant, so that process start-up is not timed);
  in turn:      one process with 2 threads doing N steps, twice.

and prints the ratio of the work rates, side by side / in turn (above 1: one thread per slot
wins). The legs alternate round by round (swapping which goes first) so background load
hits both.

    python -m benchmarks.slot_threads                      # 8x8, batch 128, 150 steps, 3 rounds
    python -m benchmarks.slot_threads --size 16 --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def child(args) -> None:
    """One process of a leg: warm up, wait for the agreed instant, time ``repeats`` x N steps."""
    import torch

    from benchmarks.engine_step import engine_step

    torch.set_num_threads(args.threads)
    step, _ = engine_step("tiny", 1, args.size, args.batch, "fp32")
    for _ in range(5):  # allocator and kernels warm
        step()
    spare = args.start_at - time.time()  # below 0: this process was late, the loops did not start together
    time.sleep(max(0.0, spare))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "spare": spare}))


def leg(processes: int, threads: int, repeats: int, args) -> float:
    """Wall seconds of the leg's step loops (the slowest process's)."""
    start_at = time.time() + args.startup
    command = [sys.executable, "-m", "benchmarks.slot_threads", "--child", "--threads", str(threads)]
    command += ["--repeats", str(repeats), "--start-at", str(start_at)]
    command += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a benchmark process failed: {outs}")
    reports = [json.loads(out.splitlines()[-1]) for out in outs]
    if any(r["spare"] < 0 for r in reports):
        raise SystemExit("a process was not ready at the agreed start: raise --startup")
    return max(sum(r["seconds"]) for r in reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--startup", type=float, default=20.0, help="seconds allowed for torch to load")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    ratios = []
    for r in range(args.rounds):
        legs = {"side by side": lambda: leg(2, 1, 1, args), "in turn": lambda: leg(1, 2, 2, args)}
        order = list(legs) if r % 2 == 0 else list(reversed(legs))
        wall = {name: legs[name]() for name in order}
        ratio = wall["in turn"] / wall["side by side"]  # the same work: the rate ratio is the time ratio
        ratios.append(ratio)
        print(
            f"round {r + 1}: {2 * args.steps} steps at {args.size}x{args.size}, batch {args.batch}: "
            f"side by side (2 x 1 thread) {wall['side by side']:.1f} s, in turn (2 threads) {wall['in turn']:.1f} s, "
            f"ratio {ratio:.2f}",
            flush=True,
        )
    print(
        f"work rate, two 1-thread slots / one 2-thread slot: median {statistics.median(ratios):.2f} over {len(ratios)} rounds"
    )


if __name__ == "__main__":
    main()
