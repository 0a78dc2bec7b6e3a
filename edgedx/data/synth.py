"""The embedded default data: synthetic head-CT studies with intracranial hemorrhage, as real DICOM.

Each study is one fake patient: an axial series of 512 x 512 CT slices stored as int16 with
Rescale Intercept -1024 (stored value = HU + 1024). Anatomy is drawn in Hounsfield units:
air, scalp, a skull with dense tables and a lighter diploe, a thin extra-axial CSF layer, grey
matter in a folded cortical ribbon, white matter, sulci and lateral ventricles, plus quantum
noise. With ``scanner=True`` (``edgedx data synth --scanner``) each study also gets an
:class:`Acquisition` as a real scanner would make it: pixel spacing of 0.42-0.55 mm (the head's size
in pixels varies), gantry tilt up to 20 degrees in 40% of studies, the noise texture of a soft,
standard or sharp reconstruction kernel, dark beam-hardening streaks across the posterior fossa near
the skull base, and -1000, -2000, -2048 or -3024 HU outside the circular field of view. It is not
the default yet: it brings real head CT inside the guard's range while the model still misreads
real anatomy (``benchmarks/README.md``, issue 11).
Positive studies carry acute blood (50-90 HU) in one or two of the five RSNA subtypes,
spanning a run of slices and thinning towards its ends, which is where the hard cases are.

Everything is drawn from ``numpy.random.default_rng([seed, study])``: the same seed gives the
same files, and a study does not change when more studies are asked for.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import ConfigError

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
LABEL_COLUMNS = ("any", *SUBTYPES)
GENERATOR_VERSION = 3  # names the default cache folder: bump when the files or the split change
SIZE = 512
PIXEL_SPACING_MM = 0.45
SLICE_THICKNESS_MM = 5.0
RESCALE_INTERCEPT = -1024

#: HU ranges the generator draws each tissue from (before noise); tests check them.
TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "scalp": (0.0, 40.0),
    "skull": (700.0, 1500.0),
    "grey": (35.0, 40.0),
    "white": (25.0, 30.0),
    "csf": (0.0, 15.0),
    "blood": (50.0, 90.0),
}


@dataclass(frozen=True)
class Difficulty:
    """How hard the lesions are to see: blood density range and a size multiplier."""

    name: str
    blood_hu: tuple[float, float]
    size_scale: float
    positive_fraction: float = 0.5


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty("easy", (65.0, 90.0), 1.4),
    # standard: tuned so that the default resnet-small reaches a test AUC of about 0.95-0.97, below
    # the ceiling where compression losses would vanish (measured: 0.966, CI 0.946-0.984)
    "standard": Difficulty("standard", (50.0, 60.0), 0.45),
    "hard": Difficulty("hard", (50.0, 56.0), 0.35),
}


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What ``edgedx data synth`` makes."""

    studies: int = 300
    slices: int = 6
    seed: int = 0
    difficulty: str = "standard"
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    scanner: bool = False  # each study its own Acquisition (spacing, tilt, kernel, padding, streaks)

    def __post_init__(self) -> None:
        if self.studies < 3:
            raise ConfigError(f"need at least 3 studies (one per split), got {self.studies}")
        if not 1 <= self.slices <= 64:
            raise ConfigError(f"slices per study must be 1..64, got {self.slices}")
        if self.difficulty not in DIFFICULTIES:
            raise ConfigError(f"unknown difficulty {self.difficulty!r}; choose from {', '.join(DIFFICULTIES)}")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ConfigError(f"split must be three positive fractions summing to 1, got {self.split}")


@dataclass(frozen=True)
class Lesion:
    """One bleed in a study: its subtype, where it is, and its extent over the slices."""

    subtype: str
    hu: float
    center_slice: float
    half_extent: float  # in slices
    angle: float  # radians, for the extra-axial and subarachnoid bleeds
    span: float  # angular half-width, radians
    size: float  # thickness or radius in pixels at the centre slice
    position: tuple[float, float]  # normalised (x, y) inside the brain, intraparenchymal only


@dataclass(frozen=True)
class Head:
    """The fixed geometry of one fake patient's head."""

    semi_axes: tuple[float, float]  # pixels, left-right and antero-posterior, widest slice
    center: tuple[float, float]
    rotation: float
    shape_phases: tuple[float, float]
    scalp_px: float
    skull_px: float
    gyri: int
    gyrus_phase: float
    cortex_px: float
    noise_hu: float


@dataclass(frozen=True)
class SliceImage:
    """One synthetic slice: HU values and the masks the generator drew them in."""

    hu: np.ndarray  # float32 (512, 512), noise included
    masks: dict[str, np.ndarray]  # tissue or subtype name -> bool (512, 512)

    @property
    def labels(self) -> dict[str, int]:
        present = {s: int(self.masks[s].any()) for s in SUBTYPES}
        return {"any": int(any(present.values())), **present}


#: Reconstruction kernels: (binomial smoothing passes on the noise, noise gain). Soft kernels give
#: blotchy, correlated noise; sharp (bone) kernels fine-grained and stronger noise.
KERNELS: dict[str, tuple[int, float]] = {"soft": (2, 0.8), "standard": (1, 1.0), "sharp": (0, 1.6)}
#: The default data's noise: white, no kernel texture (what generator version 3 drew).
WHITE_NOISE = "white"
#: What real scanners write outside the circular reconstruction field of view: air, or a padding
#: value (Toshiba/Canon -2000 and -2048, GE and Siemens -3024).
PADDING_HU = (-1000.0, -2000.0, -2048.0, -3024.0)


@dataclass(frozen=True)
class Acquisition:
    """What the scanner adds to one study: pixel spacing (so the head's size in pixels), gantry
    tilt, the reconstruction kernel's noise texture, the padding outside the field of view, and
    beam-hardening streaks across the posterior fossa near the skull base."""

    pixel_spacing_mm: float = PIXEL_SPACING_MM
    tilt_deg: float = 0.0
    kernel: str = WHITE_NOISE
    padding_hu: float = -1000.0
    streaks: bool = False


def make_acquisition(rng: np.random.Generator) -> Acquisition:
    return Acquisition(
        pixel_spacing_mm=float(rng.uniform(0.42, 0.55)),  # a field of view of 215-280 mm: the head fits
        tilt_deg=float(rng.uniform(-20, 20)) if rng.random() < 0.4 else 0.0,
        kernel=str(rng.choice(list(KERNELS))),
        padding_hu=float(rng.choice(PADDING_HU)),
        streaks=True,
    )


def _smoothed(noise: np.ndarray, passes: int) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 smoothing along both axes, ``passes`` times (edges wrap)."""
    for _ in range(passes):
        for axis in (0, 1):
            noise = (np.roll(noise, 1, axis) + 2 * noise + np.roll(noise, -1, axis)) / 4
    return noise


def make_head(rng: np.random.Generator) -> Head:
    a = rng.uniform(150, 180)
    return Head(
        semi_axes=(a, a * rng.uniform(1.15, 1.3)),
        center=(256 + rng.uniform(-25, 25), 256 + rng.uniform(-20, 20)),
        rotation=rng.uniform(-0.2, 0.2),
        shape_phases=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        scalp_px=rng.uniform(5, 9),
        skull_px=rng.uniform(13, 22),
        gyri=int(rng.integers(34, 46)),
        gyrus_phase=rng.uniform(0, 2 * np.pi),
        cortex_px=rng.uniform(9, 14),
        noise_hu=rng.uniform(3, 7),
    )


def make_lesions(rng: np.random.Generator, slices: int, difficulty: Difficulty) -> list[Lesion]:
    if rng.random() >= difficulty.positive_fraction:
        return []
    count = 1 if rng.random() < 0.75 else 2
    lesions = []
    for subtype in rng.choice(SUBTYPES, size=count, replace=False):
        size = {
            "epidural": rng.uniform(5, 26),
            "subdural": rng.uniform(2, 11),
            "intraparenchymal": rng.uniform(3, 30),
            "subarachnoid": rng.uniform(0.4, 1.0),  # fraction of sulcal depth filled
            "intraventricular": rng.uniform(0.2, 0.8),  # fraction of ventricle filled
        }[str(subtype)]
        scale = difficulty.size_scale if subtype not in ("subarachnoid", "intraventricular") else 1.0
        lo, hi = difficulty.blood_hu
        lesions.append(
            Lesion(
                subtype=str(subtype),
                hu=float(rng.uniform(lo, hi)),
                center_slice=float(rng.uniform(0, slices - 1)),
                half_extent=float(rng.uniform(0.8, max(1.0, slices * 0.6))),
                angle=float(rng.uniform(-np.pi, np.pi)),
                span=float(rng.uniform(0.25, 0.5) if subtype == "epidural" else rng.uniform(0.5, 1.3)),
                size=float(size * scale),
                position=(float(rng.uniform(-0.55, 0.55)), float(rng.uniform(-0.55, 0.55))),
            )
        )
    return lesions


def _lesion_profile(lesion: Lesion, slice_index: int) -> float:
    """How much of the lesion's size shows on this slice: 1 at its centre, falling to 0 at its ends."""
    t = (slice_index - lesion.center_slice) / lesion.half_extent
    return float(np.sqrt(max(0.0, 1.0 - t * t)))


def _texture(rng: np.random.Generator, shape: tuple[int, int], cells: int = 16) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse noise upsampled by repetition and box-blurred."""
    coarse = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    reps = (shape[0] // cells, shape[1] // cells)
    field = np.kron(coarse, np.ones(reps, np.float32))[: shape[0], : shape[1]]
    k = reps[0]
    c = np.cumsum(np.cumsum(np.pad(field, ((k, 0), (k, 0)), mode="edge"), 0), 1)
    blurred = (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)
    return np.clip(blurred / max(1e-6, float(np.abs(blurred).max())), -1, 1)


def render_slice(
    head: Head,
    lesions: list[Lesion],
    slice_index: int,
    slices: int,
    rng: np.random.Generator,
    acquisition: Acquisition = Acquisition(),
) -> SliceImage:
    """Draw one axial slice of ``head`` (0 = lowest of ``slices``) with its lesions, in HU.

    Geometry is drawn in pixels of the reference spacing (``PIXEL_SPACING_MM``) and scaled to the
    acquisition's; a tilted gantry cuts the head obliquely, so it looks longer front to back.
    """
    t = slice_index / max(1, slices - 1)
    level = 1.0 - 0.25 * t**2  # the head narrows towards the vertex
    a, b = head.semi_axes[0] * level, head.semi_axes[1] * level
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    zoom = PIXEL_SPACING_MM / acquisition.pixel_spacing_mm
    middle = (SIZE - 1) / 2
    dx = middle + (xx - middle) / zoom - head.center[0]  # exactly xx - centre at the reference spacing
    dy = (middle + (yy - middle) / zoom - head.center[1]) * np.float32(np.cos(np.radians(acquisition.tilt_deg)))
    c, s = np.cos(head.rotation), np.sin(head.rotation)
    u, v = c * dx + s * dy, -s * dx + c * dy
    theta = np.arctan2(v / b, u / a)
    wobble = 1 + 0.025 * np.sin(2 * theta + head.shape_phases[0]) + 0.015 * np.sin(3 * theta + head.shape_phases[1])
    # depth: pixels inward from the outer scalp surface (approximately, along the ellipse normal)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    radius_px = np.sqrt(a * b)
    depth = (1.0 - rho) * radius_px

    inner_skull = head.scalp_px + head.skull_px
    brain_depth = depth - inner_skull  # 0 at the inner table
    masks: dict[str, np.ndarray] = {}
    masks["air"] = depth < 0
    masks["scalp"] = (depth >= 0) & (depth < head.scalp_px)
    masks["skull"] = (depth >= head.scalp_px) & (depth < inner_skull)
    extra_axial = (brain_depth >= 0) & (brain_depth < 1.5)
    brain = brain_depth >= 1.5

    gyral = np.cos(head.gyri * theta + head.gyrus_phase + 2.0 * np.sin(3 * theta))
    sulcus_depth = head.cortex_px * (1.2 + 0.6 * np.sin(7 * theta + head.gyrus_phase))
    sulci = brain & (gyral > 0.93) & (brain_depth < sulcus_depth)
    white_start = head.cortex_px * (1.0 + 0.35 * gyral)
    midline = brain & (np.abs(u) < 1.6) & (np.abs(v) > 0.35 * b)
    vent_scale = max(0.0, 1.0 - abs(t - 0.35) / 0.45)
    ventricles = np.zeros_like(brain)
    if vent_scale > 0:
        for side in (-1, 1):
            vx, vy = u - side * 0.11 * a, v + 0.04 * b
            ang = side * 0.3
            ex = np.cos(ang) * vx + np.sin(ang) * vy
            ey = -np.sin(ang) * vx + np.cos(ang) * vy
            ventricles |= (ex / (0.055 * a * vent_scale)) ** 2 + (ey / (0.26 * b * vent_scale)) ** 2 < 1
        ventricles &= brain
    masks["csf"] = extra_axial | sulci | midline | ventricles
    masks["grey"] = brain & ~masks["csf"] & (brain_depth < white_start)
    masks["white"] = brain & ~masks["csf"] & ~masks["grey"]

    for subtype in SUBTYPES:
        masks[subtype] = np.zeros_like(brain)
    for lesion in lesions:
        profile = _lesion_profile(lesion, slice_index)
        if profile <= 0:
            continue
        dtheta = np.angle(np.exp(1j * (theta - lesion.angle))).astype(np.float32)
        within = np.clip(1 - (dtheta / lesion.span) ** 2, 0, None)
        if lesion.subtype == "epidural":  # biconvex lens against the inner table
            mask = (brain_depth >= 0) & (brain_depth < lesion.size * profile * within)
        elif lesion.subtype == "subdural":  # thin crescent following the skull
            mask = (brain_depth >= 0) & (brain_depth < lesion.size * profile * np.sqrt(within))
        elif lesion.subtype == "intraparenchymal":
            px, py = lesion.position[0] * 0.6 * a, lesion.position[1] * 0.6 * b
            r = lesion.size * profile * (1 + 0.2 * np.sin(5 * np.arctan2(v - py, u - px) + lesion.angle))
            mask = brain & ~ventricles & ((u - px) ** 2 + (v - py) ** 2 < r**2)
        elif lesion.subtype == "subarachnoid":  # blood in the sulci of one sector
            mask = (sulci | extra_axial) & (within > 0) & (brain_depth < sulcus_depth * lesion.size * profile)
        else:  # intraventricular: blood layering in the dependent (posterior) part
            cut = np.quantile(v[ventricles], 1 - lesion.size * profile) if ventricles.any() else np.inf
            mask = ventricles & (v >= cut)
        masks[lesion.subtype] |= mask

    blood = np.zeros_like(brain)
    for subtype in SUBTYPES:
        blood |= masks[subtype]
    for tissue in ("scalp", "skull", "csf", "grey", "white"):
        masks[tissue] &= ~blood
    masks["blood"] = blood

    texture = _texture(rng, (SIZE, SIZE))
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[masks["scalp"]] = 20 + 20 * texture[masks["scalp"]]
    across = np.clip((depth - head.scalp_px) / head.skull_px, 0, 1)  # 0 outer table, 1 inner table
    skull_hu = 700 + 800 * np.abs(2 * across - 1) ** 0.7 + 60 * texture
    hu[masks["skull"]] = np.clip(skull_hu, 700, 1500)[masks["skull"]]
    hu[masks["csf"]] = 7.5 + 7.5 * texture[masks["csf"]]
    hu[masks["grey"]] = 37.5 + 2.5 * texture[masks["grey"]]
    hu[masks["white"]] = 27.5 + 2.5 * texture[masks["white"]]
    for lesion in lesions:
        m = masks[lesion.subtype]
        hu[m] = np.clip(lesion.hu + 3 * texture[m], *TISSUE_HU["blood"])
    if acquisition.streaks and t < 0.3:  # dark beam-hardening streaks between the dense skull-base bones
        strength = 1.0 - t / 0.3
        for _ in range(int(rng.integers(2, 5))):
            px, py = rng.uniform(-0.4, 0.4) * a, rng.uniform(0.1, 0.5) * b
            angle = rng.uniform(-0.35, 0.35)
            distance = np.abs((u - px) * np.sin(angle) - (v - py) * np.cos(angle))
            streak = rng.uniform(15, 45) * strength * np.exp(-((distance / 1.5) ** 2))
            hu[brain] -= streak[brain]
    if acquisition.kernel == WHITE_NOISE:
        noise = rng.normal(0, head.noise_hu, size=hu.shape)
    else:
        passes, gain = KERNELS[acquisition.kernel]
        noise = _smoothed(rng.normal(0, 1, size=hu.shape), passes)
        noise *= head.noise_hu * gain / max(float(noise.std()), 1e-6)
    noisy = hu + noise.astype(np.float32) * (~masks["air"])
    outside = (xx - middle) ** 2 + (yy - middle) ** 2 > (SIZE / 2) ** 2  # the circular reconstruction field
    noisy[outside] = acquisition.padding_hu
    return SliceImage(hu=noisy, masks=masks)


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["edgedx-synth", str(seed), *map(str, parts)]))


def write_slice_dicom(
    path: Path,
    image: SliceImage,
    *,
    seed: int,
    study: int,
    index: int,
    patient_id: str,
    study_date: dt.date,
    acquisition: Acquisition = Acquisition(),
) -> str:
    """Write one slice as CT Image Storage (Explicit VR Little Endian); returns its SOPInstanceUID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    sop_uid = _uid(seed, study, "instance", index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    date = study_date.strftime("%Y%m%d")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, study, "study")
    ds.SeriesInstanceUID = _uid(seed, study, "series")
    ds.FrameOfReferenceUID = _uid(seed, study, "frame")
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = (study_date - dt.timedelta(days=365 * (20 + study % 60))).strftime("%Y%m%d")
    ds.PatientSex = "MF"[study % 2]
    ds.AccessionNumber = f"SYN{seed:04d}{study:05d}"
    ds.StudyID = str(study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyDescription = "CT HEAD WO CONTRAST (SYNTHETIC)"
    ds.SeriesDescription = "AXIAL 5MM (SYNTHETIC)"
    ds.Modality = "CT"
    ds.Manufacturer = "edgedx synthetic"
    ds.BodyPartExamined = "HEAD"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SliceThickness = SLICE_THICKNESS_MM
    z = SLICE_THICKNESS_MM * index
    spacing = round(acquisition.pixel_spacing_mm, 6)
    tilt = np.radians(acquisition.tilt_deg)
    ds.ImagePositionPatient = [round(-SIZE * spacing / 2, 4), round(-SIZE * spacing / 2, 4), z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, round(float(np.cos(tilt)), 6), round(float(-np.sin(tilt)), 6) + 0.0]
    ds.GantryDetectorTilt = round(acquisition.tilt_deg, 2)
    if acquisition.kernel != WHITE_NOISE:
        ds.ConvolutionKernel = acquisition.kernel.upper()
    ds.SliceLocation = z
    ds.PixelSpacing = [spacing, spacing]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    stored = np.clip(np.rint(image.hu) - RESCALE_INTERCEPT, -32768, 32767).astype("<i2")
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def config_from_record(record: dict[str, object]) -> SynthConfig:
    """The :class:`SynthConfig` a ``dataset.json`` (or a manifest's ``data.synthetic``) records."""
    known = {f.name for f in fields(SynthConfig)}
    values = {k: v for k, v in record.items() if k in known}
    if "split" in values:
        values["split"] = tuple(values["split"])
    return SynthConfig(**values)


def recorded_settings(config: SynthConfig) -> dict[str, object]:
    """What a manifest records of synthetic data: the generator version and every setting."""
    return {"generator_version": GENERATOR_VERSION, **asdict(config)}


def study_split(config: SynthConfig) -> list[str]:
    """Split name of each study: a seeded shuffle of patients cut in the configured fractions."""
    order = np.random.default_rng([config.seed, 10**6]).permutation(config.studies)
    n_train = max(1, round(config.split[0] * config.studies))
    n_val = max(1, round(config.split[1] * config.studies))
    n_train = min(n_train, config.studies - n_val - 1)
    names = ["test"] * config.studies
    for rank, study in enumerate(order):
        names[study] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return names


def study_patient_id(config: SynthConfig, study: int) -> str:
    """The Patient ID (and folder name) of study number ``study``."""
    return f"SYN{config.seed:03d}P{study:05d}"


def slice_file(config: SynthConfig, study: int, index: int) -> str:
    """The path, relative to the dataset folder, of slice ``index`` of study number ``study``."""
    return f"{study_patient_id(config, study)}/{index:03d}.dcm"


def render_study(config: SynthConfig, study: int) -> tuple[Acquisition, dt.date, Iterator[SliceImage]]:
    """Study number ``study``'s acquisition, date and slices (lowest first, rendered as iterated).

    Every study draws from its own seeded generator, so this gives the images ``synthesize``
    wrote, with their masks, without reading the files: benchmarks use it to know lesion sizes.
    """
    rng = np.random.default_rng([config.seed, study])
    head = make_head(rng)
    lesions = make_lesions(rng, config.slices, DIFFICULTIES[config.difficulty])
    acquisition = make_acquisition(rng) if config.scanner else Acquisition()
    date = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1800)))
    slices = (render_slice(head, lesions, i, config.slices, rng, acquisition) for i in range(config.slices))
    return acquisition, date, slices


def _write_study(out: Path, config: SynthConfig, study: int, split: str) -> list[dict[str, object]]:
    """Write one study's slices; return their rows of ``labels.csv``."""
    acquisition, date, images = render_study(config, study)
    patient = study_patient_id(config, study)
    (out / patient).mkdir(exist_ok=True)
    rows = []
    for index, image in enumerate(images):
        rel = slice_file(config, study, index)
        uid = write_slice_dicom(
            out / rel,
            image,
            seed=config.seed,
            study=study,
            index=index,
            patient_id=patient,
            study_date=date,
            acquisition=acquisition,
        )
        rows.append({"file": rel, "SOPInstanceUID": uid, "PatientID": patient, "split": split, **image.labels})
    return rows


def synthesize(
    out: Path | str, config: SynthConfig = SynthConfig(), progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write ``config.studies`` synthetic head-CT studies to ``out`` with ``labels.csv``.

    Layout: ``out/<PatientID>/<instance>.dcm``, ``out/labels.csv`` (a row per slice: file,
    SOPInstanceUID, PatientID, split and the RSNA label columns ``any`` and the five subtypes),
    and ``out/dataset.json`` (what made it).

    Args:
        out: Folder to create; must not hold an earlier ``labels.csv``.
        config: Number of studies, slices per study, seed and difficulty.
        progress: Called with (slices done, slices in all) after each study.

    Returns:
        ``out``.
    """
    out = Path(out)
    if (out / "labels.csv").exists():
        raise ConfigError(f"{out} already holds a dataset (labels.csv); choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    splits = study_split(config)
    rows: list[dict[str, object]] = []
    total = config.studies * config.slices
    # Every study draws from its own seeded generator, so studies are written in parallel and the
    # files are the same whatever the number of processes.
    workers = min(os.cpu_count() or 1, config.studies)
    with ProcessPoolExecutor(workers, get_context("fork")) as pool:
        for study_rows in pool.map(_write_study, repeat(out), repeat(config), range(config.studies), splits):
            rows += study_rows
            if progress:
                progress(len(rows), total)
    with open(out / "labels.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "SOPInstanceUID", "PatientID", "split", *LABEL_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "generator": "edgedx.data.synth",
                **recorded_settings(config),
                "slices_written": len(rows),
                "positive_slices": sum(r["any"] for r in rows),
            },
            indent=2,
        )
        + "\n"
    )
    (out / "labels.csv.tmp").rename(out / "labels.csv")  # last: a folder with labels.csv is complete
    return out
