"""Peak memory of ``edgedx train`` against the data set's size, and the per-slice figures behind an
RSNA-scale estimate.

For each data folder (the embedded default and a synthetic set ten times its size, made with
``edgedx data synth DIR --studies 3000``) and each source tree (this one, and optionally an
earlier checkout with ``--before``), one child process:

1. builds the preprocessed cache (cold: a fresh ``EDGEDX_CACHE``) and times it (this code only;
   the earlier code preprocesses inside ``train``, which its ``seconds`` then include);
2. trains ``--epochs`` epochs of the default model on it;
3. reports its own peak RSS (``VmHWM``; the cache's worker processes are not counted, they have
   ended) and each epoch's time.

Run by hand (the 10x set takes about ten minutes to make and ten to train two epochs on two cores):

    python benchmarks/streaming_rss.py /tmp/headct /tmp/headct-10x --work /tmp/edgedx-rss --before /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
from pathlib import Path
from edgedx.data import load_dataset
import edgedx.train as train_module
from edgedx.train import TrainConfig, train

data, out, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
dataset = load_dataset(data)
began = time.perf_counter()
if hasattr(train_module, "cache_split"):  # the preprocessed cache, cold: time it on its own
    train_module.prepare_data(dataset, train_module.training_spec(dataset, 64, TrainConfig().windows))
cache_seconds = time.perf_counter() - began
epoch_seconds, began = [], time.perf_counter()
result = train(dataset, out, TrainConfig(epochs=epochs, patience=epochs),
               on_epoch=lambda epoch, row: epoch_seconds.append(round(row["seconds"], 1)))
status = Path("/proc/self/status").read_text().split("\\n")
peak = next(line for line in status if line.startswith("VmHWM")).split()[1]
print(json.dumps({"cache_seconds": round(cache_seconds, 1),
                  "seconds": round(time.perf_counter() - began, 1), "epoch_seconds": epoch_seconds,
                  "peak_rss_mb": round(int(peak) / 1024, 1), "train_images": len(dataset.splits["train"]),
                  "images": sum(len(s) for s in dataset.splits.values()),
                  "test_auc": round(result.metrics["test"]["auc"], 4)}))
"""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _measure(source: Path, data: Path, work: Path, epochs: int) -> dict:
    cache = work / "cache"
    out = work / "bundle"
    env = {**os.environ, "PYTHONPATH": str(source), "EDGEDX_CACHE": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(out), str(epochs)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"training on {data} with {source} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["cache_mb"] = round(_folder_bytes(cache) / 2**20, 1) if cache.exists() else 0.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="+", help="data folders, smallest first")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--before", type=Path, help="an earlier source tree to measure side by side")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "streaming-rss.json")
    args = parser.parse_args()
    sources = {"this": HERE.parent, **({"before": args.before.resolve()} if args.before else {})}
    rows = []
    for data in args.data:
        for name, source in sources.items():
            work = args.work / f"{data.name}-{name}"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            work.mkdir(parents=True)
            began = time.perf_counter()
            row = {"data": data.name, "code": name, **_measure(source, data.resolve(), work, args.epochs)}
            row["wall_seconds"] = round(time.perf_counter() - began, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
