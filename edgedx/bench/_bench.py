"""``edgedx bench``: float vs compressed, clinical and device figures, against a device profile.

Every model is measured in a process of its own, limited as the device profile says: TFLite
models by the runtime-only probe (no TensorFlow in that process), the Keras float model by the
Keras probe. Clinical figures come from the probabilities those same processes computed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, read_bundle
from ..data import cache_split, recorded_dataset
from ..devices import load_profile, parse_profile
from ..errors import BundleError, ConfigError, DataError
from ..outputs import decisions
from ..precision import KERAS_ROLE, deployed_role, report_order
from ..preprocess import PreprocessSpec
from ..runtime.probe import run_probe
from ._report import BenchResult, machine, summarize, write_report

RUNTIME_PROBE = "edgedx.runtime.probe"
KERAS_PROBE = "edgedx.bench.keras_probe"
KIT_RUNNER = "run_kit.py"
ProgressFn = Callable[[str, int, int], None]


def _deploy_role(bundle: Bundle) -> str | None:
    return deployed_role(bundle.manifest.models, bundle.manifest.deploy)


def _plan(bundles: Sequence[Bundle], include_keras: bool) -> list[dict[str, Any]]:
    """Every (bundle, model) to measure, with what the report needs to know about it."""
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        names = [f"{b.name}#{i + 1}" for i, b in enumerate(bundles)]
    plan = []
    for name, b in zip(names, bundles, strict=True):
        for role in report_order(b.manifest.models):
            if role == KERAS_ROLE and not include_keras:
                continue
            plan.append(
                {
                    "bundle": name,
                    "bundle_path": str(b.path),
                    "role": role,
                    "class_names": b.class_names,
                    "bytes": b.model_record(role).bytes,
                    "macs": b.manifest.arch.macs if b.manifest.arch else None,
                    "threshold": b.model_threshold(role),
                    "deploy": role == _deploy_role(b),
                    "float_ops": len(b.model_record(role).float_ops),
                }
            )
    if not plan:
        raise BundleError("nothing to measure: the bundles hold no Keras or TFLite model")
    return plan


#: Inputs copied from the preprocessed cache to a probe's file at a time (bench's memory bound).
_COPY_CHUNK = 1024


def _test_inputs(
    bundles: Sequence[Bundle],
    data: Path | str | None,
    limit: int | None,
    seed: int,
    folder: Path,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, dict[str, Path]]:
    """Labels of the test split (or a sample of it) and, per bundle path, an ``.npy`` in ``folder``
    of its normalised model inputs.

    The inputs come from the preprocessed cache that ``train`` and ``compress`` use (built if
    absent), copied in chunks: this process never holds the split, whatever its size.
    """
    dataset = recorded_dataset(bundles[0].manifest.data or {}, data)
    test = dataset.splits["test"]
    index = np.arange(len(test))
    if limit and limit < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, limit, replace=False))
    by_spec: dict[PreprocessSpec, Path] = {}
    files = {}
    for b in bundles:
        spec = b.preprocess
        if spec.input != dataset.input:
            raise DataError(f"{dataset.source} holds {dataset.input!r} images; {b.path} expects another kind")
        if spec not in by_spec:
            report = (lambda done, total: progress("preprocess test", done, total)) if progress else None
            cached = cache_split(dataset, "test", spec, progress=report).inputs.normalised(spec.mean, spec.std)
            by_spec[spec] = folder / f"inputs-{len(by_spec)}.npy"
            out = np.lib.format.open_memmap(by_spec[spec], "w+", np.float32, (len(index), *cached.image_shape))
            for start in range(0, len(index), _COPY_CHUNK):
                out[start : start + _COPY_CHUNK] = cached[index[start : start + _COPY_CHUNK]]
            out.flush()
            del out
        files[str(b.path)] = by_spec[spec]
    return test.labels[index], files


def _reference_decisions(plan: list[dict[str, Any]], scores: dict[int, np.ndarray]) -> np.ndarray:
    """Decisions of the float reference: the first Keras model, else the first model measured."""
    ref = next((i for i, item in enumerate(plan) if item["role"] == "keras"), 0)
    return decisions(scores[ref], plan[ref]["threshold"])


def bench(
    bundles: Sequence[Path | str],
    device: str | Path,
    *,
    data: Path | str | None = None,
    runs: int = 200,
    warmup: int = 20,
    out: Path | str | None = None,
    include_keras: bool = True,
    ood: Path | str | None = None,
    progress: ProgressFn | None = None,
) -> BenchResult:
    """Measure every model of ``bundles`` on the test split and against ``device``'s budgets.

    Args:
        bundles: The float parent first (its Keras model is the reference for flips), then
            compressed bundles.
        device: A profile name from ``devices/`` or a TOML path.
        data: Dataset to take the test split from; default: the source the first bundle records.
        runs: Timed single-image predictions per model, after ``warmup`` untimed ones.
        out: Folder for ``bench.json``, ``report.md`` and plots; ``None`` writes nothing.
        ood: A folder of inputs that are not the model's data (other body parts, modalities,
            scanners): what each bundle's deployed model says of each (see :func:`ood_report`).
    """
    if runs < 1 or warmup < 0:
        raise ConfigError(f"need runs >= 1 and warmup >= 0, got {runs} and {warmup}")
    profile = load_profile(device)
    read = [read_bundle(b) for b in bundles]
    plan = _plan(read, include_keras)
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        labels, files = _test_inputs(read, data, None, 0, Path(tmp), progress)
        for i, item in enumerate(plan):
            if progress:
                progress(f"measuring {item['bundle']} {item['role']}", i, len(plan))
            probe = run_probe(
                KERAS_PROBE if item["role"] == "keras" else RUNTIME_PROBE,
                bundle=item["bundle_path"],
                role=item["role"],
                inputs=files[item["bundle_path"]],
                threads=profile.threads,
                workers=profile.workers,
                cpu_affinity=profile.cpu_affinity,
                # the cap is for the device's runtime; TensorFlow reserves far more address space
                memory_limit_mb=profile.memory_limit_mb if item["role"] != "keras" else 0,
                runs=runs,
                warmup=warmup,
            )
            measured.append(item | {"probe": probe})
        if progress:
            progress("measured", len(plan), len(plan))
        rates = _guard_flag_rates(read, files)
    reference = _reference_decisions(plan, {i: np.asarray(m["probe"]["probabilities"]) for i, m in enumerate(measured)})
    measured = [m | {"guard_flag_rate": rates.get(m["bundle_path"])} for m in measured]
    result = summarize(measured, labels, reference, profile, where={"machine": machine(), "source": "edgedx bench"})
    if ood is not None:
        result = replace(result, ood=[ood_report(b, ood) for b in read if _deploy_role(b)])
    return write_report(result, Path(out)) if out is not None else result


def _guard_flag_rates(bundles: Sequence[Bundle], inputs: dict[str, Path]) -> dict[str, float]:
    """Share of the test inputs (``.npy`` per bundle path) each bundle's out-of-distribution guard
    flags, scored a chunk at a time; bundles without a guard are absent."""
    rates = {}
    for b in bundles:
        guard = b.load_guard()
        if guard is not None:
            x = np.load(inputs[str(b.path)], mmap_mode="r")
            flagged = sum(
                int(np.sum(guard.scores(np.asarray(x[i : i + _COPY_CHUNK])) > 1.0))
                for i in range(0, len(x), _COPY_CHUNK)
            )
            rates[str(b.path)] = flagged / len(x) if len(x) else float("nan")
    return rates


def ood_report(bundle: Bundle, folder: Path | str) -> dict[str, Any]:
    """What a bundle's deployed model says of every file under ``folder`` (DICOM that is not its data).

    Each file is ``out_of_distribution`` (the guard or the header check flagged it, with why),
    ``positive`` or ``negative`` (classified, with its probability), or ``unreadable`` (refused
    as DICOM, with the reason): the daemon's outcomes, through the same prediction path.
    """
    from ..errors import DicomError
    from ..runtime import Model

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--ood {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"--ood {folder}: no files")
    model = Model.load(bundle, role=_deploy_role(bundle))
    rows = []
    for path in files:
        name = str(path.relative_to(folder))
        try:
            p = model.predict(path, name=name)
        except DicomError as exc:
            rows.append({"file": name, "status": "unreadable", "why": str(exc).removeprefix(f"{name}: ")})
            continue
        row: dict[str, Any] = {"file": name, "ood_score": p.ood_score}
        if p.probabilities is not None and np.ndim(p.probabilities) == 0:
            row["probability"] = round(float(p.probabilities), 4)
        if not p.in_distribution:
            row |= {"status": "out_of_distribution", "why": "; ".join(p.ood_reasons)}
        else:
            row["status"] = "positive" if p.decision else "negative"
        rows.append(row)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("out_of_distribution", "positive", "negative")}
    return {
        "bundle": bundle.name,
        "role": model.role,
        "folder": folder.name,
        "files": rows,
        "flagged": counts["out_of_distribution"],
        "classified": counts["positive"] + counts["negative"],
        "positive": counts["positive"],
        "unreadable": sum(r["status"] == "unreadable" for r in rows),
    }


# -- the offline kit --------------------------------------------------------------------------------

_RUNNER = '''"""Measure this kit's models on this box: pip install edgedx (edgedx[onnx] for ONNX models).

    python run_kit.py [RESULTS.json]

Writes the results (default: results.json beside this file); fold them into a report on the
workstation with `edgedx bench --import RESULTS.json --out DIR`.
"""

import json
import platform
import os
import sys
from pathlib import Path

from edgedx.runtime.probe import run_probe

kit_dir = Path(__file__).resolve().parent
kit = json.loads((kit_dir / "kit.json").read_text())
device = kit["device"]
results = []
for n, item in enumerate(kit["models"], 1):
    print(f"[{n}/{len(kit['models'])}] {item['bundle']} {item['role']}", file=sys.stderr)
    probe = run_probe(
        "edgedx.runtime.probe",
        bundle=kit_dir / item["bundle_dir"],
        role=item["role"],
        inputs=kit_dir / item["inputs"],
        threads=device["threads"],
        workers=device.get("workers", 1),  # kits written before profiles had workers
        cpu_affinity=device["cpu_affinity"],
        memory_limit_mb=device["memory_limit_mb"],
        runs=kit["runs"],
        warmup=kit["warmup"],
    )
    results.append({**item, "probe": probe})
machine = {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()}
out = Path(sys.argv[1]) if len(sys.argv) > 1 else kit_dir / "results.json"
out.write_text(json.dumps({"format": "edgedx-kit-results", "kit": kit, "machine": machine, "models": results}))
print(f"wrote {out}", file=sys.stderr)
'''


def export_kit(
    bundles: Sequence[Path | str],
    device: str | Path,
    out: Path | str,
    *,
    data: Path | str | None = None,
    sample: int = 200,
    runs: int = 200,
    warmup: int = 20,
    seed: int = 0,
) -> Path:
    """Write a self-contained folder to measure ``bundles``' TFLite models on an air-gapped box.

    It holds copies of the bundles, ``sample`` preprocessed test inputs with their labels, the
    float reference's decisions on them (for flips), the device profile, and ``run_kit.py``.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another folder or remove it first")
    profile = load_profile(device)
    read = [read_bundle(b) for b in bundles]
    plan = _plan(read, include_keras=True)
    with tempfile.TemporaryDirectory() as tmp:  # the sample's inputs, until copied into the kit
        labels, inputs = _test_inputs(read, data, sample, seed, Path(tmp))
        reference_item = next((item for item in plan if item["role"] == "keras"), None)
        tflite = [item for item in plan if item["role"] != "keras"]
        if not tflite:
            raise BundleError("no TFLite model to carry: compress a bundle first")
        out.mkdir(parents=True)
        (out / "data").mkdir()
        np.save(out / "data" / "labels.npy", labels)
        if reference_item is not None:
            from .._tf import keras
            from ..outputs import probabilities

            b = next(b for b in read if str(b.path) == reference_item["bundle_path"])
            model = keras.models.load_model(b.model_path("keras"), compile=False)
            logits = model.predict(np.load(inputs[str(b.path)]), verbose=0)
            scores = probabilities(logits, b.manifest.task.activation, b.calibration(KERAS_ROLE))
        else:  # no float model given: flips are counted against the first TFLite model on the box
            scores = None
        files: dict[str, str] = {}
        for n, b in enumerate(read):
            if not any(item["bundle_path"] == str(b.path) for item in tflite):
                continue
            shutil.copytree(b.path, out / "bundles" / f"{n}-{b.path.name}")
            files[str(b.path)] = f"data/inputs-{n}.npy"
            shutil.copyfile(inputs[str(b.path)], out / files[str(b.path)])
        models = []
        for item in tflite:
            n = next(n for n, b in enumerate(read) if str(b.path) == item["bundle_path"])
            entry = {k: v for k, v in item.items() if k != "bundle_path"}
            where = {"bundle_dir": f"bundles/{n}-{read[n].path.name}", "inputs": files[item["bundle_path"]]}
            models.append(entry | where)
        kit = {
            "format": "edgedx-kit",
            "device": profile.to_dict(),
            "runs": runs,
            "warmup": warmup,
            "labels": "data/labels.npy",
            "reference": None
            if scores is None
            else {
                "bundle": reference_item["bundle"],
                "role": "keras",
                "decisions": decisions(scores, reference_item["threshold"]).tolist(),
            },
            "models": models,
        }
        (out / "kit.json").write_text(json.dumps(kit, indent=2) + "\n")
        (out / KIT_RUNNER).write_text(_RUNNER)
        return out


def import_results(results_file: Path | str, out: Path | str | None = None) -> BenchResult:
    """Fold a kit's ``results.json`` (written on the device) into the same report ``bench`` writes."""
    path = Path(results_file)
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read kit results ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != "edgedx-kit-results":
        raise DataError(f"{path}: not the results of an edgedx kit (run_kit.py writes them)")
    missing = [key for key in ("kit", "machine", "models") if key not in body]
    if missing or not body["models"]:
        absent = ", ".join(missing) or "models"
        raise DataError(f"{path}: incomplete kit results (missing {absent}); run run_kit.py again")
    kit = body["kit"]
    labels_file = path.parent / kit["labels"]
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: the kit's labels are missing; keep results.json inside the kit folder")
    labels = np.load(labels_file)
    profile = parse_profile(kit["device"]["name"], _profile_fields(kit["device"]), f"{path} (device)")
    measured = body["models"]
    if kit["reference"] is not None:
        reference = np.asarray(kit["reference"]["decisions"])
    else:
        reference = decisions(np.asarray(measured[0]["probe"]["probabilities"]), measured[0]["threshold"])
    result = summarize(measured, labels, reference, profile, where={"machine": body["machine"], "source": str(path)})
    return write_report(result, Path(out)) if out is not None else result


def _profile_fields(device: dict[str, Any]) -> dict[str, Any]:
    fields = ("description", "workers", "threads", "cpu_affinity", "memory_limit_mb", "budgets")
    return {k: device[k] for k in fields if k in device}  # a kit from before profiles had workers: 1
