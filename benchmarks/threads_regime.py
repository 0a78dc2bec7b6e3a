"""Per-slice latency at 1 and 2 threads, back to back and with the daemon's work between slices.

``edgedx bench`` and ``compress --quantize auto`` time one-image calls back to back at the device
profile's ``threads``. The daemon (``edgedx serve``) does other work between two inferences: it
reads, decodes and preprocesses the next slice, during which the engines' worker threads go idle.
This times every deployable model of the given bundles both ways, in interleaved rounds, with the
preprocessing of a 512x512 HU slice (``to_model_input``, the daemon's own step) between calls,
and reports the CPU time each call costs (thread pools that spin cost more than they run).

    python benchmarks/threads_regime.py BUNDLE [BUNDLE ...] [--rounds 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    from edgedx.bundle import read_bundle
    from edgedx.precision import precision_of_role
    from edgedx.preprocess import to_model_input
    from edgedx.runtime import Model

    models = {}
    for path in args.bundles:
        bundle = read_bundle(path)
        for role in bundle.manifest.models:
            if precision_of_role(role) and role not in {r for _, r in models}:
                for threads in (1, 2):
                    models[(threads, role)] = Model.load(bundle, role=role, threads=threads)
    spec = next(iter(models.values())).spec
    slice_hu = np.random.default_rng(0).normal(40, 300, (512, 512)).astype(np.float32)
    x = to_model_input(slice_hu, spec)[None]

    def timed(model, between: bool) -> tuple[float, float]:
        latencies = np.empty(args.calls)
        cpu = time.process_time()
        for i in range(args.calls):
            if between:
                to_model_input(slice_hu, spec)  # what the daemon does before the next inference
            began = time.perf_counter()
            model.predict_inputs(x)
            latencies[i] = time.perf_counter() - began
        return float(np.median(latencies) * 1e3), (time.process_time() - cpu) / args.calls * 1e3

    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for (threads, role), model in models.items():
            for between in (False, True):
                for _ in range(20):
                    model.predict_inputs(x)
                p50, cpu = timed(model, between)
                row = results.setdefault(f"{role} {threads} thread(s) {'daemon' if between else 'back to back'}", {})
                row.setdefault("p50_ms", []).append(p50)
                row.setdefault("cpu_ms_per_call", []).append(cpu)
    summary = {name: {k: float(np.median(v)) for k, v in row.items()} for name, row in results.items()}
    out = HERE / "results" / "threads-regime.json"
    out.write_text(json.dumps({"bundles": [str(b) for b in args.bundles], "rows": summary}, indent=2) + "\n")
    print("| model, threads, regime | p50 ms (inference) | CPU ms per call (with preprocessing, daemon rows) |")
    print("|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['p50_ms']:.3f} | {row['cpu_ms_per_call']:.3f} |")
    print(f"-> {out.relative_to(HERE)}")


if __name__ == "__main__":
    main()
