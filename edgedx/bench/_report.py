"""From measured probabilities and timings to figures, budgets, ``bench.json``, a Markdown report and plots.

Shared by ``edgedx bench`` (measured here) and ``edgedx bench --import`` (measured on an air-gapped
box by the offline kit), so both give the same report.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as clinical
from ..calibration import reliability
from ..devices import DeviceProfile, device_figures
from ..outputs import decisions
from ..precision import ENGINES, precision_label, precision_of_role
from ..runtime.probe import LATENCY_TIE, summarize_latency


@dataclass(frozen=True)
class BenchResult:
    """What ``edgedx bench`` measured: one row per model, the budgets missed, and notes."""

    device: DeviceProfile
    rows: list[dict[str, Any]]
    missed: list[str]
    notes: list[str]
    labels: list[int]
    out: Path | None = None
    ood: list[dict[str, Any]] | None = None  # per bundle, what its guard and model said of --ood files

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device.to_dict(),
            "rows": self.rows,
            "missed": self.missed,
            "notes": self.notes,
            "labels": self.labels,
            **({"ood": self.ood} if self.ood is not None else {}),
        }


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()}


def summarize(
    measured: list[dict[str, Any]],
    labels: np.ndarray,
    reference_decisions: np.ndarray,
    device: DeviceProfile,
    *,
    where: dict[str, Any],
    resamples: int = 1000,
) -> BenchResult:
    """Turn raw measurements into report rows, check the device budgets and note precision surprises.

    Each item of ``measured`` has ``bundle``, ``role``, ``bytes``, ``macs``, ``threshold``,
    ``deploy`` (whether the bundle deploys this model: budgets apply to it), ``probe`` (the
    output of a probe process, with ``probabilities``) and optionally ``float_ops`` (int8 ops kept
    in float32).
    """
    rows, missed = [], []
    for item in measured:
        probe = item["probe"]
        scores = np.asarray(probe["probabilities"])
        figures = clinical.evaluate(
            labels, scores, item["threshold"], resamples=resamples, label_names=item.get("class_names")
        )
        flipped = decisions(scores, item["threshold"]) != reference_decisions
        flips = float(np.mean(flipped))
        latency = summarize_latency(probe["latency_ms"])
        row = {
            "bundle": item["bundle"],
            "role": item["role"],
            "precision": precision_label(item["role"], item.get("float_ops", 0)),
            "deploy": item["deploy"],
            "clinical": {
                k: figures[k] for k in ("n", "auc", "auc_ci95", "sensitivity", "specificity", "accuracy", "ece")
            }
            | {"flips": flips, "flips_ci95": list(clinical.proportion_ci(int(flipped.sum()), flipped.size))}
            | {"threshold": item["threshold"], "guard_flag_rate": item.get("guard_flag_rate")}
            | _per_label(figures),
            "device": {
                **latency,
                "load_seconds": probe["load_seconds"],
                "cold_start_seconds": probe.get("cold_start_seconds"),
                "throughput_per_s": probe["throughput_per_s"],
                "peak_rss_mb": probe["peak_rss_mb"],
                "bytes": item["bytes"],
                "macs": item["macs"],
                "gmac_per_s": item["macs"] / (latency["p50_ms"] / 1000) / 1e9 if item["macs"] else None,
                "backend": probe["backend"],
                "workers": probe.get("workers", 1),
                "threads": probe["threads"],
                "tensorflow_loaded": probe["tensorflow_loaded"],
                "notes": probe.get("notes", []),
            },
            "latency_ms": probe["latency_ms"],
            "scores": scores.tolist(),
        }
        if item["deploy"]:
            measured = device_figures(
                latency_p95_ms=latency["p95_ms"], peak_rss_mb=probe["peak_rss_mb"], model_bytes=item["bytes"]
            )
            row["budgets_missed"] = device.check(measured | {"min_auc": figures["auc"], "max_flips": flips})
            missed += [f"{item['bundle']} {item['role']}: {m}" for m in row["budgets_missed"]]
        rows.append(row)
    _probability_shifts(rows)
    notes = _engine_notes(rows, device) + _precision_notes(rows, device) + _where_notes(where)
    return BenchResult(device, rows, missed, notes, np.asarray(labels).tolist())


def _per_label(figures: dict[str, Any]) -> dict[str, Any]:
    """A multi-label model's test AUC (95% CI) per label; nothing for other tasks."""
    if "per_label" not in figures:
        return {}
    return {
        "per_label": {
            name: {"auc": f["auc"], "auc_ci95": f.get("auc_ci95"), "positives": f["positives"]}
            for name, f in figures["per_label"].items()
        },
        "mean_auc": figures["mean_auc"],
    }


def _probability_shifts(rows: list[dict[str, Any]]) -> None:
    """Median |p - p_float32| of each compressed binary model against its own bundle's float32 model.

    Calibration is meant to make a quantized model report its float model's probability; this is
    the check, on the test split.
    """
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        mine = {r["role"]: r for r in rows if r["bundle"] == bundle}
        base = mine.get("tflite-float32")
        if base is None or np.asarray(base["scores"]).ndim != 1:
            continue
        for role, row in mine.items():
            if precision_of_role(role) and role != "tflite-float32":
                shift = np.abs(np.asarray(row["scores"]) - np.asarray(base["scores"]))
                row["clinical"]["median_abs_dp_vs_float32"] = float(np.median(shift))


def _engine_notes(rows: list[dict[str, Any]], device: DeviceProfile) -> list[str]:
    """Say where a deployed model runs on an engine the device profile does not list."""
    notes = []
    for row in rows:
        precision = precision_of_role(row["role"])
        if row["deploy"] and precision and precision.engine not in device.engines:
            notes.append(
                f"{row['bundle']} deploys {row['role']}, but the {device.name} profile lists no {precision.engine} "
                f"engine: that box needs {ENGINES[precision.engine].label} installed (measured here with it)"
            )
    return notes


def _precision_notes(rows: list[dict[str, Any]], device: DeviceProfile) -> list[str]:
    """Say where a deployable model is slower than LiteRT float32 on this device (by more than a tie),
    and name the fastest."""
    notes = []
    for bundle in dict.fromkeys(r["bundle"] for r in rows):
        deployable = {r["role"]: r for r in rows if r["bundle"] == bundle and precision_of_role(r["role"])}
        if len(deployable) < 2 or "tflite-float32" not in deployable:
            continue
        fastest = min(deployable.values(), key=lambda r: r["device"]["p50_ms"])
        base = deployable["tflite-float32"]["device"]["p50_ms"]
        for role, row in deployable.items():
            p50 = row["device"]["p50_ms"]
            if role != "tflite-float32" and p50 > base * (1 + LATENCY_TIE):
                notes.append(
                    f"{bundle}: {row['precision']} is slower than float32 on {device.name} "
                    f"(p50 {p50:.2f} ms vs {base:.2f} ms); the fastest here is {fastest['precision']} "
                    f"({fastest['device']['p50_ms']:.2f} ms)"
                )
    return notes


def _where_notes(where: dict[str, Any]) -> list[str]:
    m = where.get("machine", {})
    return [f"measured on {m.get('platform', '?')} ({m.get('cpus', '?')} CPUs) from {where.get('source', '?')}"]


def write_report(result: BenchResult, out: Path) -> BenchResult:
    """``bench.json``, ``report.md``, ``roc.png`` (binary tasks), ``reliability.png`` and ``latency.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    plots = _plots(result, out)
    lines = [
        f"# edgedx bench on `{result.device.name}`",
        "",
        f"{result.device.description}: {result.device.regime} (timed at once), CPUs "
        f"{list(result.device.cpu_affinity) or 'any'}, memory cap "
        f"{result.device.memory_limit_mb or 'none'} MB. Budgets: "
        + (", ".join(f"{k} {v:g}" for k, v in result.device.budgets.items()) or "none"),
        "",
        "| model | precision | AUC (95% CI) | sens | spec | flips (95% CI) | ECE | flagged | p50 ms | p95 ms | "
        "p99 ms | img/s | RSS MB | cold start s | KB | GMAC/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        c, d = r["clinical"], r["device"]
        lo, hi = c["auc_ci95"]
        flips_lo, flips_hi = c["flips_ci95"]
        gmac = f"{d['gmac_per_s']:.2f}" if d["gmac_per_s"] else "-"
        cold = f"{d['cold_start_seconds']:.2f}" if d["cold_start_seconds"] is not None else "-"
        lines.append(
            f"| {r['bundle']}{' (deploy)' if r['deploy'] else ''} | {r['precision']} | {c['auc']:.4f} "
            f"({lo:.3f}-{hi:.3f}) | {c['sensitivity']:.3f} | {c['specificity']:.3f} | {c['flips']:.3f} "
            f"({flips_lo:.3f}-{flips_hi:.3f}) | "
            f"{_maybe(c.get('ece'), '.3f')} | {_maybe(c.get('guard_flag_rate'), '.1%')} | "
            f"{d['p50_ms']:.2f} | {d['p95_ms']:.2f} | {d['p99_ms']:.2f} | {d['throughput_per_s']:.0f} | "
            f"{d['peak_rss_mb']:.0f} | {cold} | {d['bytes'] / 1024:.0f} | {gmac} |"
        )
    shifts = [r for r in result.rows if "median_abs_dp_vs_float32" in r["clinical"]]
    if shifts:
        lines += ["", "Median |p - p_float32| on the test split (the same bundle's float32 model): "]
        lines[-1] += ", ".join(
            f"{r['bundle']} {r['precision']} {r['clinical']['median_abs_dp_vs_float32']:.4f}" for r in shifts
        )
    labelled = [r for r in result.rows if "per_label" in r["clinical"]]
    if labelled:
        names = list(labelled[0]["clinical"]["per_label"])
        lines += ["", "## Per label (multi-label models): test AUC (95% CI), positives", ""]
        lines += ["| model | precision | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in labelled:
            cells = []
            for name in names:
                f = r["clinical"]["per_label"][name]
                ci = f.get("auc_ci95")
                cells.append(
                    "- (no positives)"
                    if f["auc"] != f["auc"]
                    else f"{f['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}), {f['positives']}"
                )
            lines.append(f"| {r['bundle']} | {r['precision']} | " + " | ".join(cells) + " |")
    if result.ood is not None:
        lines += ["", "## Inputs from --ood", "", "| model | file | status | p | why |", "|---|---|---|---|---|"]
        for entry in result.ood:
            for f in entry["files"]:
                p = _maybe(f.get("probability"), ".3f")
                lines.append(f"| {entry['bundle']} | {f['file']} | {f['status']} | {p} | {f.get('why', '')} |")
        lines += [""] + [
            f"- {e['bundle']}: {e['flagged']} of {len(e['files'])} flagged, {e['classified']} classified "
            f"({e['positive']} positive), {e['unreadable']} unreadable"
            for e in result.ood
        ]
    lines += ["", "## Budgets", ""]
    lines += [f"- MISSED: {m}" for m in result.missed] or ["- every deployed model meets every budget"]
    lines += ["", "## Notes", "", *[f"- {n}" for n in result.notes], ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return replace(result, out=out)


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _plots(result: BenchResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    written = []
    labels = np.asarray(result.labels)
    binary = all(np.asarray(r["scores"]).ndim == 1 for r in result.rows)
    if binary:
        fig, ax = plt.subplots(figsize=(5, 5))
        for r in result.rows:
            fpr, tpr, _ = roc_curve(labels, r["scores"])
            ax.plot(fpr, tpr, label=f"{r['bundle']} {r['precision']} (AUC {r['clinical']['auc']:.3f})")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, test split ({result.device.name})")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=120)
        plt.close(fig)
        written.append(out / "roc.png")
    headline = labels[:, 0] if labels.ndim == 2 else labels  # multi-label: the first label's
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in result.rows:
        scores = np.asarray(r["scores"])
        curve = reliability(headline, scores[:, 0] if labels.ndim == 2 else scores)
        ece = r["clinical"].get("ece")
        ax.plot(
            curve["confidence"],
            curve["observed"],
            marker="o",
            ms=3,
            label=f"{r['bundle']} {r['precision']}" + (f" (ECE {ece:.3f})" if ece is not None else ""),
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    what = "positive-class probability" if binary or labels.ndim == 2 else "top-class confidence"
    ax.set(xlabel=f"predicted {what}", ylabel="observed frequency", title="Reliability, test split (15 bins)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    written.append(out / "reliability.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result.rows:
        ax.hist(r["latency_ms"], bins=40, alpha=0.5, label=f"{r['bundle']} {r['precision']}")
    ax.set(xlabel="latency per image, ms", ylabel="runs", title=f"Latency on {result.device.name}")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    written.append(out / "latency.png")
    return written
