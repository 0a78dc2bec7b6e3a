"""Distillation and pruning recipes for a teacher bundle, one step at a time, chosen on validation AUC.

Distill variants train a student from the teacher and save it; prune variants start from a saved
student. A variant is ``key=value`` pairs joined by ``:``; distill keys: ``width`` (0.35),
``epochs`` (20), ``T`` (4), ``alpha`` (0.3), ``mix`` (mixup Beta parameter, 0 = off), ``init``
(``scratch``, or ``teacher``: start from the teacher's most active channels), ``lr`` (the
teacher's learning rate times this, 1); prune keys:
``sparsity`` (0.75), ``epochs`` (8), ``teacher`` (1 = fine-tune under the distillation loss),
``mix``. Every run appends a JSON line (validation and test AUC, seconds) to ``--out``, with
its fidelity to the teacher: the decisions it changes ("flips") and its sensitivity minus the
teacher's, at the threshold ``compress`` would give it (the one that agrees most with the teacher
on validation data). Distillation records them for every epoch too.

    python benchmarks/compress_recipes.py distill TEACHER "epochs=20,epochs=40,epochs=40:mix=1" --out r.jsonl
    python benchmarks/compress_recipes.py prune TEACHER "teacher=0,teacher=1:mix=1" --student S.keras --out r.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def _variant(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in text.split(":") if "=" in pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("distill", "prune"))
    parser.add_argument("teacher", type=Path)
    parser.add_argument("variants", help="comma-separated variants")
    parser.add_argument("--student", type=Path, help="prune: the saved student to start from")
    parser.add_argument("--data", type=Path, help="the teacher's data, if not where its manifest says")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from edgedx import metrics as clinical
    from edgedx._tf import keras, tf
    from edgedx.bundle import read_bundle
    from edgedx.compress import distill, prune
    from edgedx.compress._pipeline import INHERIT_SAMPLES, _matching_threshold
    from edgedx.compress.inherit import inherit_channels
    from edgedx.compress.quantize import representative_samples
    from edgedx.data import recorded_dataset
    from edgedx.models import count_parameters
    from edgedx.train import TrainConfig, fit, predict_scores, prepare_data

    bundle = read_bundle(args.teacher)
    recipe = bundle.manifest.training.config
    train_config = TrainConfig(**{**recipe, "windows": tuple(recipe["windows"])})
    dataset = recorded_dataset(bundle.manifest.data or {}, args.data)
    data = prepare_data(dataset, bundle.preprocess)
    activation = bundle.manifest.task.activation
    teacher = keras.models.load_model(bundle.model_path("keras"), compile=False)
    steps_per_epoch = math.ceil(len(data.y["train"]) / train_config.batch_size)
    splits = ("val", "test")
    teacher_threshold = bundle.calibration("keras").uncalibrated_threshold(bundle.threshold)
    teacher_scores = {s: predict_scores(teacher, data.x[s], activation) for s in splits}
    teacher_decisions = {s: teacher_scores[s] >= teacher_threshold for s in splits}

    def figures(model) -> dict[str, float]:
        """AUC, and flips and sensitivity against the teacher at the threshold matched on validation data."""
        scores = {s: predict_scores(model, data.x[s], activation) for s in splits}
        threshold = _matching_threshold(scores["val"], teacher_scores["val"], teacher_threshold)
        row = {}
        for s in splits:
            decided, positive = scores[s] >= threshold, data.y[s] == 1
            row[f"{s}_auc"] = round(clinical.auc(data.y[s], scores[s]), 4)
            row[f"{s}_flips"] = round(float(np.mean(decided != teacher_decisions[s])), 4)
            row[f"{s}_sensitivity_change"] = round(
                float(np.mean(decided[positive]) - np.mean(teacher_decisions[s][positive])), 4
            )
        return row

    def epoch_logger(model, seen: list[dict[str, float]]):
        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            seen.append({"epoch": epoch, "loss": round(row["loss"], 4)} | figures(model))
            print(json.dumps(seen[-1]), flush=True)

        return on_epoch

    for text in args.variants.split(","):
        options = _variant(text)
        keras.utils.set_random_seed(0)
        tf.config.experimental.enable_op_determinism()
        began = time.perf_counter()
        mix = float(options.get("mix", 0))
        epochs_seen: list[dict[str, float]] = []
        if args.step == "distill":
            epochs = int(options.get("epochs", 20))
            student, _ = distill.choose_student(
                teacher,
                bundle.manifest.arch.name,
                len(bundle.class_names),
                width=float(options.get("width", 0.35)),
            )
            if options.get("init", "scratch") == "teacher":
                sample = representative_samples(data.x["train"], INHERIT_SAMPLES, 0)
                inherit_channels(teacher, student, sample)
            trainer = distill.distiller(
                teacher,
                student,
                temperature=float(options.get("T", 4)),
                alpha=float(options.get("alpha", 0.3)),
                mixup=mix,
            )
            fit(
                trainer,
                data,
                replace(
                    train_config,
                    epochs=epochs,
                    patience=max(train_config.patience, epochs // 2),
                    learning_rate=train_config.learning_rate * float(options.get("lr", 1)),
                ),
                activation=activation,
                augmentation=dataset.augmentation,
                on_epoch=epoch_logger(student, epochs_seen),
            )
            result = student
            result.save(args.out.parent / f"student-{text.replace(':', '_').replace('=', '')}.keras")
        else:
            epochs = int(options.get("epochs", 8))
            student = keras.models.load_model(args.student, compile=False)
            wrapped, callbacks, end_step = prune.prunable(
                student,
                sparsity=float(options.get("sparsity", 0.75)),
                structure="unstructured",
                steps=epochs * steps_per_epoch,
                distribution="erk",
            )
            trainee = (
                distill.distiller(teacher, wrapped, temperature=4.0, alpha=0.3, mixup=mix)
                if options.get("teacher", "1") == "1"
                else wrapped
            )
            fit(
                trainee,
                data,
                replace(train_config, epochs=epochs, patience=epochs, learning_rate=train_config.learning_rate / 5),
                activation=activation,
                augmentation=dataset.augmentation,
                callbacks=callbacks,
                select_from_epoch=math.ceil(end_step / steps_per_epoch) + 1,
            )
            result = prune.strip(wrapped)
        record = {
            "step": args.step,
            "variant": text,
            "from": str(args.student.name) if args.student else bundle.name,
            "nonzero_parameters": count_parameters(result)[1],
            **figures(result),
            "seconds": round(time.perf_counter() - began),
            "epochs": epochs_seen,
        }
        print(json.dumps(record), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
