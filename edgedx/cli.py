"""The ``edgedx`` command: a thin typer layer over the Python API.

Each command parses its options, calls one library function, renders the result and exits.
TensorFlow-side modules are imported inside command bodies, so ``edgedx --help`` and the
runtime-only commands never load TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import ConfigError, DependencyError, EdgedxError
from .precision import QUANTIZE_CHOICES

app = typer.Typer(
    help="Put medical-imaging CNNs onto scanner-side hardware: data, train, compress, bench, serve.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold patient data
    add_completion=False,
    # Plain help: rich's option tables cut long option names ("--max-sensitiv…") at 80 columns.
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Make or read datasets (synthetic head CT, DICOM folders, MedMNIST, image folders).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data", short_help="Make or read datasets: synthetic head CT, DICOM, MedMNIST, images.")
console = Console()
err_console = Console(stderr=True)


class Difficulty(str, Enum):
    easy = "easy"
    standard = "standard"
    hard = "hard"


class ThresholdPolicy(str, Enum):
    youden = "youden"
    sensitivity = "sensitivity"


@contextmanager
def _progress():
    """A rich progress display; yields ``report(stage, done, total)`` for the library to call."""
    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield report


@contextmanager
def _user_errors():
    """Turn edgedx's own errors (and a missing [train] extra) into one line and exit code 1."""
    try:
        yield
    except ImportError as exc:  # a TF-side module's dependency is not installed
        error: EdgedxError = DependencyError(
            f"this command needs the [train] extra ({exc.name} is missing): pip install 'edgedx[train]'"
        )
    except EdgedxError as exc:
        error = exc
    else:
        return
    err_console.print(f"[red]{type(error).__name__}[/red]: {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _print_table(table: Table, on: Console = console) -> None:
    """Print a table with every figure whole: as wide as its content needs, past the terminal's width
    or a log file's 80 columns if it must, instead of cutting cells to "0.9…"."""
    needed = on.measure(table, options=on.options.update_width(10_000)).maximum
    width = on.width
    on.width = max(width, needed)  # print() itself never goes wider than the console
    try:
        on.print(table, crop=False)
    finally:
        on.width = width


def _print_epoch(epoch: int, row: dict[str, float]) -> None:
    """A line per training epoch on stderr, so a log file shows progress where no bar is drawn."""
    err_console.print(
        f"epoch {epoch:3d}  loss {row['loss']:.4f}  val AUC {row['val_auc']:.4f}  {row['seconds']:.1f}s",
        highlight=False,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:.3f}-{value[1]:.3f}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):  # a threshold per label
        return ", ".join(f"{v:.3f}" for v in value)
    return str(value)


def _metrics_table(title: str, metrics: dict[str, dict[str, Any]]) -> Table:
    columns = {
        "auc": "AUC",
        "auc_ci95": "AUC 95% CI",
        "accuracy": "acc",
        "sensitivity": "sens",
        "specificity": "spec",
        "ppv": "PPV",
        "npv": "NPV",
        "n": "n",
    }
    table = Table(title=title)
    table.add_column("split")
    for header in columns.values():
        table.add_column(header, justify="right")
    for split, row in metrics.items():
        table.add_row(split, *(_fmt(row.get(key, "")) for key in columns))
        for label, figures in list(row.get("per_label", {}).items())[1:]:  # multi-label: the first is the row
            table.add_row(f"  {label}", *(_fmt(figures.get(key, "")) for key in columns))
    return table


def version_callback(value: bool) -> None:
    if value:
        console.print(f"edgedx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show TensorFlow's own C++ log lines (hidden by default).")
    ] = False,
) -> None:
    """edgedx: from medical images to a scanner-side device."""
    if verbose:
        os.environ["EDGEDX_TF_LOGS"] = "1"  # read by edgedx._tf, before TensorFlow is imported


@data_app.command("synth", short_help="Write synthetic head-CT DICOM studies (no download).")
def data_synth(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the DICOM studies and labels.csv into.")],
    studies: Annotated[int, typer.Option(help="Number of studies (one fake patient each).")] = 300,
    slices: Annotated[int, typer.Option(help="Axial slices per study.")] = 6,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 0,
    difficulty: Annotated[Difficulty, typer.Option(help="Lesion size and density range.")] = Difficulty.standard,
    scanner: Annotated[
        bool,
        typer.Option(
            help="Give each study its own scanner: pixel spacing, gantry tilt, kernel noise texture, padding "
            "outside the field of view, skull-base streaks."
        ),
    ] = False,
) -> None:
    """Write synthetic head-CT studies with intracranial hemorrhage as real DICOM (no download).

    One 512x512 CT file per slice (HU = stored - 1024), labels.csv in the RSNA layout (any,
    epidural, intraparenchymal, intraventricular, subarachnoid, subdural) and a patient-level
    train/val/test split.
    """
    from .data import SynthConfig, synthesize

    with _user_errors():
        config = SynthConfig(studies=studies, slices=slices, seed=seed, difficulty=difficulty.value, scanner=scanner)
        with _progress() as report:
            synthesize(out, config, progress=lambda done, total: report("synthesize", done, total))
    summary = json.loads((out / "dataset.json").read_text())
    console.print(
        f"wrote {summary['slices_written']} slices ({summary['positive_slices']} with hemorrhage) "
        f"from {studies} studies to {out}"
    )


@data_app.command("info")
def data_info(
    path: Annotated[
        Path, typer.Argument(metavar="PATH", help="A DICOM folder with labels.csv, a MedMNIST .npz or an image folder.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Read a dataset and show its classes and split sizes."""
    from .data import load_dataset

    with _user_errors():
        summary = load_dataset(path).summary()
    if as_json:
        console.print_json(data=summary)
        return
    table = Table(title=f"{summary['name']} ({summary['input']}) from {summary['source']}")
    table.add_column("split")
    table.add_column("images", justify="right")
    for name in summary["classes"]:
        table.add_column(name, justify="right")
    for split, row in summary["splits"].items():
        table.add_row(split, str(row["images"]), *map(str, row["per_class"]))
    _print_table(table)


@app.command("models", short_help="List the architectures, with parameters and MACs.")
def models_list(
    input_size: Annotated[int, typer.Option(help="Input side in pixels for the MAC count.")] = 64,
    channels: Annotated[int, typer.Option(help="Input channels (3 for brain,subdural,bone windows).")] = 3,
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered architectures with parameter counts and MACs at an input size."""
    rows = []
    with _user_errors():
        from .models import count_macs, count_parameters, create_model, list_architectures

        for name in list_architectures():
            model = create_model(name, (input_size, input_size, channels), classes)
            rows.append({"arch": name, "parameters": count_parameters(model)[0], "macs": count_macs(model)})
    if as_json:
        console.print_json(data=rows)
        return
    table = Table(title=f"architectures at {input_size}x{input_size}x{channels}, {classes} classes")
    for col in ("arch", "parameters", "MMACs"):
        table.add_column(col, justify="left" if col == "arch" else "right")
    for row in rows:
        table.add_row(row["arch"], f"{row['parameters']:,}", f"{row['macs'] / 1e6:.1f}")
    _print_table(table)


@app.command("train", short_help="Train a float CNN and write a model bundle.")
def train_command(
    out: Annotated[Path, typer.Option(help="Bundle folder to write (must not exist).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="A DICOM folder with labels.csv, a MedMNIST .npz or an image folder. "
            "Default: the embedded synthetic head-CT set, generated on first use."
        ),
    ] = None,
    arch: Annotated[str, typer.Option(help="Architecture (see `edgedx models`).")] = "resnet-small",
    width: Annotated[float | None, typer.Option(help="Channel width multiplier (default: the arch's own).")] = None,
    input_size: Annotated[
        int | None,
        typer.Option(help="Model input side in pixels (default: 64 for head CT, the native size for MedMNIST)."),
    ] = None,
    windows: Annotated[
        str, typer.Option(help="CT windows stacked as channels: presets brain, subdural, bone, or CENTER/WIDTH in HU.")
    ] = "brain,subdural,bone",
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping on validation AUC).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 64,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 1e-3,
    patience: Annotated[
        int,
        typer.Option(help="Epochs without validation-AUC gain before stopping, counted once it is above chance."),
    ] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    augment: Annotated[
        bool,
        typer.Option(
            help="Flip, rotate, shift and zoom training images where the data allows (no flip for left/right "
            "classes, none of it for organ bounding-box crops such as OrganMNIST)."
        ),
    ] = True,
    threshold: Annotated[
        ThresholdPolicy, typer.Option(help="How the decision threshold is chosen on validation data.")
    ] = ThresholdPolicy.youden,
    target_sensitivity: Annotated[
        float | None, typer.Option(help="With --threshold sensitivity: the sensitivity to reach, e.g. 0.95.")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="Label columns of an RSNA-layout labels.csv to learn, comma-separated; several make a "
            "multi-label model (a sigmoid and a threshold each). 'rsna' = any and the five hemorrhage subtypes. "
            "Default: any."
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Fine-tune from this trained bundle instead of starting from scratch (a site adapting a shipped "
            "model to its own labelled scans): its architecture, weights and preprocessing are kept."
        ),
    ] = None,
    freeze_layers: Annotated[
        int, typer.Option(help="With --init: keep the first N layers with weights as they are.")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Train a float CNN and write a model bundle (model.keras, manifest.json, history.json, guard.npz).

    The bundle also gets a calibration of its probabilities and an out-of-distribution guard, both
    fitted on validation data.

    With TF_CONFIG naming two or more workers (Kubeflow's TFJob and the cloud trainers set it),
    every worker runs this same command: they train one model together
    (MultiWorkerMirroredStrategy, each batch split between them) and worker 0 writes the bundle.
    """
    with _user_errors():
        from .data import RSNA_LABELS, default_dataset, load_dataset
        from .train import TrainConfig, train

        config = TrainConfig(
            arch=arch,
            width=width,
            input_size=input_size,
            windows=tuple(windows.split(",")),
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            patience=patience,
            seed=seed,
            augment=augment,
            threshold_policy=threshold.value,
            target_sensitivity=target_sensitivity,
            freeze_layers=freeze_layers,
        )
        if freeze_layers and init is None:
            raise ConfigError("--freeze-layers keeps layers of an initial model: use it with --init BUNDLE")
        with _progress() as report:
            columns = None
            if labels:
                columns = RSNA_LABELS if labels.strip() == "rsna" else tuple(c.strip() for c in labels.split(","))
            dataset = (
                load_dataset(data, labels=columns)
                if data
                else default_dataset(
                    progress=lambda done, total: report("synthesize default", done, total), labels=columns
                )
            )

            on_epoch = None if as_json else _print_epoch
            result = train(dataset, out, config, init=init, progress=report, on_epoch=on_epoch, overwrite=overwrite)
    if result.bundle is None:
        console.print(
            f"trained as a worker of a multi-worker job in {result.seconds:.0f}s; the chief writes the bundle"
        )
        return
    if as_json:
        console.print_json(
            data={
                "bundle": str(result.bundle.path),
                "seconds": round(result.seconds, 1),
                "threshold": result.bundle.threshold,
                "metrics": result.metrics,
            }
        )
        return
    _print_table(_metrics_table(f"{result.bundle.name}: {arch} on {dataset.name}", result.metrics))
    console.print(
        f"bundle written to {result.bundle.path} in {result.seconds:.0f}s (threshold {_fmt(result.bundle.threshold)})"
    )


@app.command("info", short_help="Show a bundle's manifest and check its files.")
def info_command(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A model bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
) -> None:
    """Show a bundle's manifest: model, preprocessing, threshold, data and metrics; checks checksums."""
    from .bundle import read_bundle

    with _user_errors():
        b = read_bundle(bundle)
    m = b.manifest
    if as_json:
        console.print_json(data=m.to_dict())
        return
    spec = b.preprocess
    console.print(f"[bold]{b.name}[/bold]  (edgedx bundle v{m.format_version}, made by edgedx {m.edgedx_version})")
    if m.arch:
        console.print(f"arch        {m.arch.name}  {m.arch.parameters:,} parameters, {m.arch.macs / 1e6:.1f} MMACs")
    console.print(f"task        {m.task.kind}: {', '.join(m.task.class_names)}")
    windows = ", ".join(f"{w.name} {w.center:g}/{w.width:g}" for w in spec.windows) or "grey levels"
    console.print(f"input       {list(m.input.shape)} {m.input.dtype}; {spec.input}: {windows}")
    console.print(f"threshold   {_fmt(b.threshold)} ({m.threshold.policy})")
    data = m.data or {}
    console.print(f"data        {data.get('name')} from {data.get('source')}")
    if b.synthetic_only:
        console.print("[bold yellow]trained on synthetic data only: not validated on real scans[/]")
    guard = m.guard
    if guard:
        rates = ", ".join(f"{split} {rate:.1%}" for split, rate in guard.get("flag_rate", {}).items())
        console.print(f"guard       {guard['components']} components; flags {rates}")
    else:
        console.print("guard       none (a bundle made before guards): every input is classified")
    for role, rec in m.models.items():
        console.print(f"model       {role}: {rec.file} {rec.bytes:,} bytes sha256 {rec.sha256[:16]}")
    if m.metrics:
        _print_table(_metrics_table("metrics", m.metrics))
    console.print("checksums   all files match the manifest")


Quantization = Enum("Quantization", {choice: choice for choice in QUANTIZE_CHOICES}, type=str)


class PruneStructure(str, Enum):
    unstructured = "unstructured"
    two_four = "2:4"


class LayerSparsity(str, Enum):
    uniform = "uniform"
    erk = "erk"


class StudentInit(str, Enum):
    teacher = "teacher"
    scratch = "scratch"


def _steps_table(title: str, steps: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for header in (
        "step",
        "params",
        "non-zero",
        "MMACs",
        "KB",
        "KB gz",
        "val AUC",
        "test AUC",
        "sens",
        "spec",
        "flips",
        "s",
    ):
        table.add_column(header, justify="left" if header == "step" else "right")
    for row in steps:
        table.add_row(
            row["step"],
            f"{row['parameters']:,}",
            f"{row['nonzero_parameters']:,}",
            f"{row['macs'] / 1e6:.1f}",
            f"{row['bytes'] / 1024:.1f}",
            f"{row['gzip_bytes'] / 1024:.1f}",
            _fmt(row["val"]["auc"]),
            _fmt(row["test"]["auc"]),
            _fmt(row["test"]["sensitivity"]),
            _fmt(row["test"]["specificity"]),
            f"{row['flips']:.1%}",
            f"{row['seconds']:.0f}",
        )
    return table


def _search_table(search: dict[str, Any]) -> Table:
    table = Table(title=f"--target-kb {search['target_kb']:g}: candidates (* kept)")
    for header in ("", "width", "sparsity", "non-zero", "KB", "val AUC", "val sens", "test AUC", "fits", "limits", "s"):
        table.add_column(header, justify="right")
    for i, row in enumerate(search["candidates"]):
        table.add_row(
            "*" if i == search["chosen"] else "",
            f"{row['width']:g}",
            f"{row['sparsity']:.0%}",
            f"{row['nonzero_parameters']:,}",
            f"{row['bytes'] / 1024:.1f}",
            _fmt(row["val_auc"]),
            _fmt(row["val_sensitivity"]),
            _fmt(row["test_auc"]),
            "yes" if row["within_budget"] else "no",
            "yes" if row["within_limits"] else "no",
            f"{row['seconds']:.0f}",
        )
    return table


@app.command("compress", short_help="Distill, prune and quantize a bundle; report each cost.")
def compress_command(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A bundle written by `edgedx train`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (must not exist).")],
    distill: Annotated[bool, typer.Option("--distill", help="Distill into a smaller student first.")] = False,
    student: Annotated[str | None, typer.Option(help="Student architecture (default: the teacher's).")] = None,
    width: Annotated[
        float | None,
        typer.Option(
            help="Student width multiplier (default: the widest whose deployed model keeps at most 1/8 of the "
            "teacher's parameters: with --prune, 1/8 non-zero after pruning)."
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of the label loss; 1 - alpha weighs the teacher.")] = 0.3,
    mixup: Annotated[
        float,
        typer.Option(
            help="Distill on mixed pairs of images too (the teacher labels them), Beta(mixup, mixup) weights; 0: off."
        ),
    ] = 1.0,
    prune: Annotated[bool, typer.Option("--prune", help="Magnitude-prune (tensorflow-model-optimization).")] = False,
    sparsity: Annotated[float, typer.Option(help="Target fraction of zero weights.")] = 0.5,
    structure: Annotated[
        PruneStructure, typer.Option(help="unstructured, or 2:4 blocks.")
    ] = PruneStructure.unstructured,
    layer_sparsity: Annotated[
        LayerSparsity,
        typer.Option(
            help="Unstructured: every layer to --sparsity (uniform), or narrow layers denser and wide ones "
            "sparser, --sparsity overall (erk, Erdos-Renyi-Kernel)."
        ),
    ] = LayerSparsity.erk,
    prune_with_teacher: Annotated[
        bool,
        typer.Option(
            "--prune-with-teacher/--prune-on-labels",
            help="With --distill: fine-tune the pruned student under the distillation loss, or on the labels alone.",
        ),
    ] = True,
    distill_epochs: Annotated[
        int | None,
        typer.Option(help="Distillation epochs (default: the teacher's; twice that from --student-init scratch)."),
    ] = None,
    student_init: Annotated[
        StudentInit,
        typer.Option(
            help="teacher: start the student from the teacher's most active channels (same architecture, "
            "narrower); scratch: from random weights."
        ),
    ] = StudentInit.teacher,
    quantize: Annotated[
        Quantization,
        typer.Option(
            help="Format to deploy: a TFLite precision, or onnx-float32 (ONNX Runtime); auto: the fastest on "
            "--device that passes the guard, of the engines the device profile lists."
        ),
    ] = Quantization.int8,
    device: Annotated[
        str | None, typer.Option(help="Device profile that --quantize auto measures the candidates on.")
    ] = None,
    target_kb: Annotated[
        float | None,
        typer.Option(
            help="With --distill --quantize int8: size student widths and sparsities to fit an int8 file of this "
            "many KB, train the few that fit and keep the most accurate (frontier table and frontier.png in the "
            "bundle). Overrides --width, --prune and --sparsity."
        ),
    ] = None,
    search_candidates: Annotated[int, typer.Option(help="--target-kb: how many candidates to train.")] = 3,
    qat: Annotated[
        bool, typer.Option("--qat", help="Quantization-aware training instead of post-training int8.")
    ] = False,
    max_auc_drop: Annotated[
        float,
        typer.Option(
            help="Refuse the result if it loses more validation AUC than this against BUNDLE (and retry int8 "
            "that loses more than this against its float model with QAT first)."
        ),
    ] = 0.01,
    max_sensitivity_drop: Annotated[
        float, typer.Option(help="Refuse the result if it loses more validation sensitivity than this against BUNDLE.")
    ] = 0.02,
    accept_loss: Annotated[
        bool,
        typer.Option(
            "--accept-loss",
            help="Write the bundle even when it loses more than allowed; the manifest records the loss.",
        ),
    ] = False,
    max_flips: Annotated[
        float,
        typer.Option(
            help="int8: if more validation decisions than this differ from the float model's, retry with "
            "the first 1-3 ops kept in float (int8 in and out)."
        ),
    ] = 0.02,
    integer_only: Annotated[
        bool,
        typer.Option("--integer-only", help="int8: keep every op int8 (integer-only accelerators); report flips."),
    ] = False,
    data: Annotated[
        Path | None, typer.Option(help="Fine-tuning data (default: what the bundle was trained on).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the step report as JSON.")] = False,
) -> None:
    """Shrink a trained model: distill -> prune -> quantize, reporting what each step cost.

    Writes a bundle with the float32 TFLite model and the compressed one; its manifest keeps the
    step report under compression.steps. int8 that changes more than --max-flips of the float
    model's validation decisions is retried with its first ops in float; int8 that loses more than
    --max-auc-drop validation AUC is retried with quantization-aware training, then refused (no
    output written).

    With TF_CONFIG naming two or more workers, every worker runs this same command: they distill
    and prune the student together (MultiWorkerMirroredStrategy) and worker 0 alone converts it,
    measures it and writes the bundle.
    """
    with _user_errors():
        from .compress import CompressConfig, compress

        config = CompressConfig(
            distill=distill,
            student=student,
            width=width,
            temperature=temperature,
            alpha=alpha,
            mixup=mixup,
            prune=prune,
            sparsity=sparsity,
            structure=structure.value,
            layer_sparsity=layer_sparsity.value,
            prune_with_teacher=prune_with_teacher,
            distill_epochs=distill_epochs,
            student_init=student_init.value,
            quantize=quantize.value,
            device=device,
            target_kb=target_kb,
            search_candidates=search_candidates,
            qat=qat,
            max_auc_drop=max_auc_drop,
            max_sensitivity_drop=max_sensitivity_drop,
            accept_loss=accept_loss,
            max_flips=max_flips,
            integer_only=integer_only,
            seed=seed,
        )

        def on_step(row: dict[str, Any]) -> None:
            if not as_json:
                err_console.print(
                    f"step {row['step']}: val AUC {row['val']['auc']:.4f}, val sensitivity "
                    f"{row['val']['sensitivity']:.4f}, {row['nonzero_parameters']:,} non-zero parameters, "
                    f"{row['bytes']:,} B, {row['seconds']:.0f}s",
                    highlight=False,
                )

        with _progress() as report:
            result = compress(
                bundle,
                out,
                config,
                data=data,
                progress=report,
                on_epoch=None if as_json else _print_epoch,
                on_step=on_step,
                overwrite=overwrite,
            )
    if result.bundle is None:
        console.print(
            f"trained the students as a worker of a multi-worker job in {result.seconds:.0f}s; "
            "the chief converts them and writes the bundle"
        )
        return
    if as_json:
        console.print_json(data={"bundle": str(result.bundle.path), "steps": result.steps})
        return
    _print_table(_steps_table(f"{bundle.name} -> {result.bundle.name}", result.steps))
    for row in result.steps:
        for note in row["notes"]:
            console.print(f"  {row['step']}: {note}", highlight=False)
    compression = result.bundle.manifest.compression
    if compression.search:
        _print_table(_search_table(compression.search))
    loss = compression.loss_against_parent
    verdict = "within" if loss.within_limits else "MORE than allowed, written because of --accept-loss:"
    console.print(
        f"against {bundle.name} on validation data: AUC {-loss.val_auc_drop:+.4f}, sensitivity "
        f"{-loss.val_sensitivity_drop:+.4f} ({verdict} --max-auc-drop {loss.max_auc_drop}, "
        f"--max-sensitivity-drop {loss.max_sensitivity_drop})",
        highlight=False,
    )
    console.print(
        f"bundle written to {result.bundle.path} in {result.seconds:.0f}s (deploys {result.bundle.manifest.deploy})"
    )


def _bench_table(result: Any) -> Table:
    table = Table(title=f"bench on {result.device.name}")
    headers = ("model", "precision", "AUC", "sens", "spec", "flips", "ECE", "OOD", "p50 ms", "p95 ms", "img/s")
    for header in (*headers, "RSS MB", "KB"):
        table.add_column(header, justify="left" if header in ("model", "precision") else "right")
    for r in result.rows:
        c, d = r["clinical"], r["device"]
        flagged = c.get("guard_flag_rate")
        table.add_row(
            r["bundle"] + (" *" if r["deploy"] else ""),
            r["precision"],
            _fmt(c["auc"]),
            _fmt(c["sensitivity"]),
            _fmt(c["specificity"]),
            f"{c['flips']:.1%}",
            _fmt(c.get("ece")),
            "-" if flagged is None else f"{flagged:.1%}",
            f"{d['p50_ms']:.2f}",
            f"{d['p95_ms']:.2f}",
            f"{d['throughput_per_s']:.0f}",
            f"{d['peak_rss_mb']:.0f}",
            f"{d['bytes'] / 1024:.0f}",
        )
    return table


@app.command("bench", short_help="Measure float vs compressed against a device profile.")
def bench_command(
    bundles: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="BUNDLE",
            help="Bundles to measure: the float parent first (the reference for flips), then compressed.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Device profile: a name in devices/ or a .toml path.")] = "host",
    data: Annotated[
        Path | None, typer.Option(help="Data whose test split to use (default: what the first bundle records).")
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed single-image predictions per model.")] = 200,
    warmup: Annotated[int, typer.Option(help="Untimed predictions before timing.")] = 20,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, report.md and the plots.")] = Path("bench-report"),
    export_kit: Annotated[
        Path | None, typer.Option(help="Instead of measuring here, write an offline kit to this folder.")
    ] = None,
    sample: Annotated[int, typer.Option(help="Test images carried in an offline kit.")] = 200,
    import_file: Annotated[
        Path | None, typer.Option("--import", help="Fold a kit's results.json into a report instead.")
    ] = None,
    ood: Annotated[
        Path | None,
        typer.Option(
            help="A folder of DICOM files that are not the model's data (other body parts, modalities, "
            "scanners): the report says which the out-of-distribution guard flags and what the rest get."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Measure float vs compressed models: clinical figures and device figures against a profile's budgets.

    Each model runs in a process of its own, limited as the device profile says (CPUs, memory, and
    the daemon's workers x threads: one model per worker, timed at once); TFLite and ONNX models run
    on the TensorFlow-free runtime. Exits 1 when a deployed model
    misses a budget, naming it. --export-kit writes a folder to carry to an air-gapped box
    (run `python run_kit.py` there); --import folds its results.json into the same report.
    """
    with _user_errors():
        from .bench import bench, import_results
        from .bench import export_kit as write_kit

        if import_file is not None:
            result = import_results(import_file, out)
        elif not bundles:
            raise ConfigError("give at least one bundle (or --import RESULTS.json)")
        elif export_kit is not None:
            kit = write_kit(bundles, device, export_kit, data=data, sample=sample, runs=runs, warmup=warmup)
            console.print(f"kit written to {kit}; on the device run: python {kit.name}/run_kit.py")
            return
        else:
            with _progress() as report:
                result = bench(bundles, device, data=data, runs=runs, warmup=warmup, out=out, ood=ood, progress=report)
    if as_json:
        rows = [{k: v for k, v in row.items() if k not in ("scores", "latency_ms")} for row in result.rows]
        console.print_json(
            data={
                "device": result.device.to_dict(),
                "rows": rows,
                "missed": result.missed,
                "notes": result.notes,
                "out": str(result.out),
            }
        )
    else:
        _print_table(_bench_table(result))
        for note in result.notes:
            console.print(f"  {note}", highlight=False)
        for entry in result.ood or []:
            console.print(
                f"  --ood {entry['folder']}: {entry['bundle']} flagged {entry['flagged']} of {len(entry['files'])} "
                f"files, classified {entry['classified']} ({entry['positive']} positive), "
                f"{entry['unreadable']} unreadable",
                highlight=False,
            )
        console.print(f"report written to {result.out}/report.md (* = the bundle's deployed model)")
    if result.missed:
        for missed in result.missed:
            err_console.print(f"[red]budget missed[/red]: {escape(missed)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


def _tls_files(cert: Path | None, key: Path | None, client_ca: Path | None):
    from .serve import TlsFiles

    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    return TlsFiles(cert=cert, key=key, client_ca=client_ca)


@app.command("serve", short_help="Run the on-device inference daemon (DICOM in, results out).")
def serve_command(
    out: Annotated[Path, typer.Option(help="Folder for results, structured reports and the quarantine.")],
    inbox: Annotated[
        Path | None, typer.Option(help="Folder the scanner exports DICOM files to; taken once their size is stable.")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Model bundle to serve (default: the shipped models/headct-ich-int8).")
    ] = None,
    dicom_port: Annotated[int | None, typer.Option(help="Listen for DICOM C-STORE and C-ECHO on this port.")] = None,
    ae_title: Annotated[str, typer.Option(help="This daemon's AE title.")] = "EDGEDX",
    allow_ae: Annotated[
        str | None,
        typer.Option(help="Comma-separated calling AE titles allowed to send (default: any, loopback only)."),
    ] = None,
    max_associations: Annotated[int, typer.Option(help="Concurrent DICOM associations.")] = 4,
    http_port: Annotated[
        int | None, typer.Option(help="Serve POST /v1/predict, /healthz, /readyz and /metrics on this port.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback needs a token (HTTP) and --allow-ae.")
    ] = "127.0.0.1",
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the HTTP bearer token (or set EDGEDX_TOKEN).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Device profile (a name in devices/ or a .toml path): run its workers, threads and CPUs, "
            "as bench and --quantize auto measured the model there."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Inference workers, each with its own interpreter (default: 2, or --device's).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Interpreter threads per worker (default: 1, or --device's).")
    ] = None,
    queue_size: Annotated[
        int, typer.Option(help="Accepted, unfinished inputs at most; beyond it senders hear 'busy'.")
    ] = 64,
    max_file_mb: Annotated[float, typer.Option(help="Larger inputs are quarantined (HTTP: refused).")] = 64.0,
    spool: Annotated[Path | None, typer.Option(help="Durable spool of accepted inputs (default: OUT/.spool).")] = None,
    stable_seconds: Annotated[
        float, typer.Option(help="How long an inbox file must keep its size before it is taken.")
    ] = 1.0,
    no_sr: Annotated[
        bool, typer.Option("--no-sr", help="Write JSON results only, no DICOM Structured Reports.")
    ] = False,
    min_free_mb: Annotated[
        float,
        typer.Option(
            help="Free space on OUT below which new inputs are refused (C-STORE 0xA700, HTTP 507) "
            "and /readyz says why; accepted inputs are still finished."
        ),
    ] = 256.0,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: DICOM TLS (BCP 195, TLS 1.2+) and HTTPS on both ports.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA: clients must present a certificate it signed (mutual TLS).")
    ] = None,
    forward_to: Annotated[
        str | None,
        typer.Option(
            help="Send every SR by C-STORE to this PACS, AE@host:port, from a durable outbox with retries "
            "(an outage delays results, loses none)."
        ),
    ] = None,
) -> None:
    """Run the on-device inference daemon: DICOM in (inbox, C-STORE, HTTP), results out.

    An input is acknowledged only once it is in the daemon's spool on disk; after a crash the
    restart finishes it, and every accepted input gets exactly one result:
    OUT/series/<series>/instances/<instance>.json (+ .sr.dcm) and OUT/series/<series>/series.json
    (maximum over slices). Unusable inputs go to OUT/quarantine with the reason beside them.
    Instances are named by a hash of their SOP Instance UID: logs and metrics carry no patient data.
    SIGTERM or Ctrl-C finishes queued work and exits.
    """
    import logging
    import os
    import warnings

    with _user_errors():
        from .serve import Destination, ServeConfig, Service

        if token_file is not None and not token_file.is_file():
            raise ConfigError(f"--token-file {token_file} does not exist")
        token = token_file.read_text().strip() if token_file else os.environ.get("EDGEDX_TOKEN") or None
        chosen = {k: v for k, v in (("workers", workers), ("threads", threads)) if v is not None}
        settings = dict(
            **chosen,
            out=out,
            bundle=bundle,
            inbox=inbox,
            spool=spool,
            host=host,
            dicom_port=dicom_port,
            ae_title=ae_title,
            allow_ae=tuple(a.strip() for a in (allow_ae or "").split(",") if a.strip()),
            max_associations=max_associations,
            http_port=http_port,
            token=token,
            queue_size=queue_size,
            max_file_mb=max_file_mb,
            stable_seconds=stable_seconds,
            structured_reports=not no_sr,
            min_free_mb=min_free_mb,
            tls=_tls_files(tls_cert, tls_key, tls_client_ca),
            forward_to=Destination.parse(forward_to) if forward_to else None,
        )
        config = ServeConfig.on_device(device, **settings) if device else ServeConfig(**settings)
        # pydicom warns about non-conformant header values by quoting them (names, dates): not in a PHI-free log
        warnings.filterwarnings("ignore", module=r"pydicom\..*")
        warnings.filterwarnings("ignore", module=r"highdicom\..*")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
        service = Service(config)
        service.start()
        model = service.daemon.models[0]
        table = Table(title=f"edgedx serve {__version__}", show_header=False)
        decided = (
            "argmax"
            if model.threshold is None
            else f"threshold {model.threshold:.4f}"
            if isinstance(model.threshold, float)
            else f"a threshold per label ({', '.join(model.class_names)})"
        )
        table.add_row("model", f"{service.bundle.name} ({model.role}, {model.backend}, {decided})")
        if service.bundle.synthetic_only:
            table.add_row("[bold yellow]trained on[/]", "[bold yellow]synthetic data only: not validated on real scans")
        guard = model.guard
        table.add_row(
            "guard",
            "none in this bundle: every input is classified"
            if guard is None
            else f"flagged inputs get no decision ({guard.rates.get('test', 0):.1%} of test inputs flagged)",
        )
        cpus = f", CPUs {list(config.cpu_affinity)}" if config.cpu_affinity else ""
        on = f" ({device})" if device else ""
        table.add_row("workers", f"{config.workers} x {config.threads} thread(s){cpus}{on}, queue {queue_size}")
        for listener in service.listeners():
            table.add_row(listener.kind, escape(listener.where))
        table.add_row("results", escape(str(out)))
        if service.recovered:
            table.add_row("recovered", f"{service.recovered} accepted inputs from the spool")
        _print_table(table, on=err_console)
        try:
            service.wait()
        finally:
            drained = service.stop()
        raise typer.Exit(code=0 if drained else 3)


def main() -> None:
    app()
