"""Fuzz the DICOM path of the runtime: N mutants of real and synthetic slices, each in a child process.

    python benchmarks/fuzz_dicom.py --mutants 100000 [--workers 2] [--out benchmarks/results/fuzz.json]

Seeds: every file of ../shared/data/dicom-real (where present) and four synthetic slices made
here. Counts results, EdgedxError refusals, other exceptions (with the mutant numbers that
reproduce them: ``fuzz_kit.mutant(seeds, number)``), crashes, hangs over the time limit, and
the worker processes' RSS. The harness is ``tests/fuzz_kit.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzz_kit import run  # noqa: E402

from edgedx.data import SynthConfig, synthesize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=100_000)
    parser.add_argument("--first", type=int, default=0, help="number of the first mutant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a mutant may take")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args()
    real = ROOT.parent / "shared" / "data" / "dicom-real"
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = synthesize(Path(tmp) / "headct", SynthConfig(studies=3, slices=2, seed=0))
        seeds = (sorted(real.rglob("*.dcm")) if real.is_dir() else []) + sorted(synthetic.rglob("*.dcm"))[:4]
        report = run(
            ROOT / "models" / "headct-ich-int8",
            seeds,
            range(args.first, args.first + args.mutants),
            workers=args.workers,
            timeout=args.timeout,
        )
    print(report.summary())
    record = {
        "mutants": report.mutants,
        "first": args.first,
        "seeds": [p.name for p in seeds],
        "outcomes": dict(report.outcomes.most_common()),
        "leaked": {str(k): v for k, v in report.leaked.items()},
        "crashed": report.crashed,
        "hung": report.hung,
        "slowest_seconds": round(report.slowest_seconds, 4),
        "worker_rss_mb": [round(v, 1) for v in report.worker_rss_mb],
        "seconds": round(report.seconds, 1),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    sys.exit(0 if report.clean else 1)


if __name__ == "__main__":
    main()
