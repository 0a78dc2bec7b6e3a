"""One worker against two on the embedded default: same model, same data, same global batch.

Each worker is pinned to its own core (``taskset``), so the two-worker job has twice the cores of
the one-worker job, as adding a machine would: speedup = T(1 worker) / T(2 workers) and scaling
efficiency = speedup / 2. Both train the README's default model (``edgedx train`` defaults, 20
epochs, global batch 64: each of two workers takes 32 of every batch) and are measured on the same
test split. Needs a machine with two free cores and ``taskset``; run by hand (about 15 minutes on
the 2-core EPYC):

    python benchmarks/distributed_scaling.py --work /tmp/edgedx-scaling

``--compress TEACHER`` measures ``edgedx compress TEACHER --distill --prune --quantize none
--accept-loss`` instead (the students' training, the part the workers share; conversion is the
chief's alone):

    python benchmarks/distributed_scaling.py --work /tmp/edgedx-scaling-compress --compress work/headct-float
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(workers: int, out: Path, step: list[str]) -> dict:
    """``edgedx STEP`` as ``workers`` processes, worker i pinned to core i; wall time until all end.

    A bundle already at ``out`` (a finished run of an interrupted benchmark) is measured, not trained again.
    """
    from edgedx.distributed import local_addresses

    if (out / "manifest.json").is_file():
        return _measured(workers, out, seconds=None)

    addresses = local_addresses(workers)
    command = [sys.executable, "-m", "edgedx", *step, "--out", str(out), "--json"]
    processes = []
    began = time.perf_counter()
    for index in range(workers):
        env = dict(os.environ)
        if workers > 1:
            cluster = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            env["TF_CONFIG"] = json.dumps(cluster)
        log = out.parent / f"{out.name}-worker{index}.log"  # every worker's own log, kept for diagnosis
        processes.append(
            (
                log,
                subprocess.Popen(
                    ["taskset", "-c", str(index), *command],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log.open("w"),
                ),
            )
        )
    codes = [process.wait() for _, process in processes]
    seconds = time.perf_counter() - began
    for (log, _), code in zip(processes, codes, strict=True):
        if code != 0:
            sys.exit(f"{' '.join(command)} failed (exit {code}); its log {log} ends:\n{log.read_text()[-3000:]}")
    return _measured(workers, out, seconds)


def _measured(workers: int, out: Path, seconds: float | None) -> dict:
    from edgedx.bundle import read_bundle

    manifest = read_bundle(out).manifest
    test = manifest.metrics["test"]
    common = {"workers": workers, "cores": workers, "wall_seconds": round(seconds, 1) if seconds is not None else None}
    if manifest.compression is not None:
        rows = {row["step"]: row for row in manifest.compression.steps}
        return {
            **common,
            "recorded_workers": manifest.compression.workers,
            "compress_seconds": manifest.compression.seconds,
            "step_seconds": {name: row["seconds"] for name, row in rows.items() if name != "parent"},
            "test_auc": test["auc"],
            "test_auc_ci95": test["auc_ci95"],
            "val_auc": manifest.metrics["val"]["auc"],
        }
    return {
        **common,
        "train_seconds": manifest.training.seconds,
        "epochs_run": manifest.training.epochs_run,
        "best_epoch": manifest.training.best_epoch,
        "test_auc": test["auc"],
        "test_auc_ci95": test["auc_ci95"],
        "val_auc": manifest.metrics["val"]["auc"],
        "train_slices": manifest.data["splits"]["train"]["images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgedx-scaling"))
    parser.add_argument("--compress", type=Path, metavar="TEACHER", help="measure compress of this bundle instead")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more `edgedx train` options after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    if args.compress:
        step = ["compress", str(args.compress), "--distill", "--prune", "--quantize", "none", "--accept-loss", *extra]
    else:
        step = ["train", *extra]
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs taskset and two cores")
    args.work.mkdir(parents=True, exist_ok=True)  # finished runs in it are kept: remove it to start afresh
    runs = [_run(1, args.work / "one", step), _run(2, args.work / "two", step)]
    one, two = runs
    timed = "compress_seconds" if args.compress else "train_seconds"
    speedup = one[timed] / two[timed]
    result = {
        "command": " ".join(["edgedx", *step, *([] if args.compress else ["(defaults, embedded data)"])]),
        "runs": runs,
        "speedup": round(speedup, 3),
        "scaling_efficiency": round(speedup / 2, 3),
        "test_auc_difference": round(two["test_auc"] - one["test_auc"], 4),
    }
    if not args.compress:
        result["slices_per_second_per_worker"] = {
            str(r["workers"]): round(r["train_slices"] * r["epochs_run"] / r["train_seconds"] / r["workers"], 1)
            for r in runs
        }
    name = "distributed-scaling-compress" if args.compress else "distributed-scaling"
    out = HERE / "results" / f"{name}-cpu{os.cpu_count()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
