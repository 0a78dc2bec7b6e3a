"""The embedded synthetic head CT: real DICOM, HU-correct tissues, labels that match the masks."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

from edgedx.data.synth import (
    DIFFICULTIES,
    SUBTYPES,
    TISSUE_HU,
    Lesion,
    SynthConfig,
    make_head,
    render_slice,
    render_study,
    slice_file,
    study_split,
)
from edgedx.errors import ConfigError
from edgedx.preprocess import modality_lut


class TestFiles:
    def test_dicom_is_readable_ct(self, tiny_headct):
        ds = pydicom.dcmread(next(tiny_headct.rglob("*.dcm")))
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
        assert (ds.Rows, ds.Columns, ds.PixelRepresentation) == (512, 512, 1)
        assert ds.pixel_array.dtype == np.int16
        assert (ds.RescaleSlope, ds.RescaleIntercept) == (1, -1024)
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid and pydicom.uid.UID(ds.StudyInstanceUID).is_valid
        assert (ds.WindowCenter, ds.WindowWidth) == (40, 80)

    def test_labels_csv_layout_and_patient_split(self, tiny_headct):
        with open(tiny_headct / "labels.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 30
        assert list(rows[0])[-6:] == [
            "any",
            "epidural",
            "intraparenchymal",
            "intraventricular",
            "subarachnoid",
            "subdural",
        ]
        split_of: dict[str, set[str]] = {}
        for row in rows:
            split_of.setdefault(row["PatientID"], set()).add(row["split"])
            assert int(row["any"]) == max(int(row[s]) for s in SUBTYPES)
            assert pydicom.dcmread(tiny_headct / row["file"]).SOPInstanceUID == row["SOPInstanceUID"]
        assert all(len(s) == 1 for s in split_of.values()), "a patient is in two splits"
        assert {s for v in split_of.values() for s in v} == {"train", "val", "test"}

    def test_deterministic_for_a_seed_whatever_the_number_of_processes(self, tmp_path, monkeypatch):
        from edgedx.data import synthesize

        a = synthesize(tmp_path / "a", SynthConfig(studies=3, slices=2, seed=7))
        monkeypatch.setattr("os.cpu_count", lambda: 1)
        b = synthesize(tmp_path / "b", SynthConfig(studies=3, slices=2, seed=7))
        assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
        files = sorted(a.rglob("*.dcm"))
        assert len(files) == 6
        for f in files:
            assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()

    def test_render_study_redraws_the_written_slices_with_their_masks(self, tiny_headct):
        config = SynthConfig(studies=10, slices=3, seed=0, difficulty="easy")  # the fixture's
        with open(tiny_headct / "labels.csv") as f:
            rows = {row["file"]: row for row in csv.DictReader(f)}
        for study in (0, 7):
            _, date, images = render_study(config, study)
            for index, image in enumerate(images):
                rel = slice_file(config, study, index)
                ds = pydicom.dcmread(tiny_headct / rel)
                hu = modality_lut(ds.pixel_array, ds.RescaleSlope, ds.RescaleIntercept)
                assert np.abs(hu - image.hu).max() <= 0.5  # the file stores whole HU
                assert ds.StudyDate == date.strftime("%Y%m%d")
                assert int(rows[rel]["any"]) == int(image.masks["blood"].any())

    def test_refuses_to_overwrite(self, tiny_headct):
        from edgedx.data import synthesize

        with pytest.raises(ConfigError, match="already holds a dataset"):
            synthesize(tiny_headct, SynthConfig(studies=3, slices=1))


class TestAnatomy:
    @pytest.mark.parametrize("subtype", SUBTYPES)
    def test_tissue_hu_inside_masks(self, tmp_path, subtype):
        """Written, read back with pydicom and the modality LUT: each tissue sits in its HU range."""
        from edgedx.data.synth import write_slice_dicom

        rng = np.random.default_rng(11)
        head = make_head(rng)
        lesion = Lesion(
            subtype=subtype,
            hu=70.0,
            center_slice=0.0,
            half_extent=2.0,
            angle=0.5,
            span=0.8,
            size=18.0 if subtype not in ("subarachnoid", "intraventricular") else 0.8,
            position=(0.2, -0.1),
        )
        image = render_slice(head, [lesion], 0, 3, rng)
        import datetime as dt

        path = tmp_path / "s.dcm"
        write_slice_dicom(path, image, seed=0, study=0, index=0, patient_id="T", study_date=dt.date(2021, 1, 1))
        ds = pydicom.dcmread(path)
        hu = modality_lut(ds.pixel_array, ds.RescaleSlope, ds.RescaleIntercept)
        assert image.masks[subtype].sum() > 20, f"{subtype} lesion was not drawn"
        assert image.labels["any"] == 1 and image.labels[subtype] == 1
        noise = 4 * head.noise_hu + 1  # 4 sigma of quantum noise plus rounding
        for tissue, (lo, hi) in TISSUE_HU.items():
            inside = hu[image.masks[tissue]]
            assert inside.size > 0, tissue
            assert lo - 1 <= np.median(inside) <= hi + 1, f"{tissue}: median {np.median(inside)} HU"
            p1, p99 = np.percentile(inside, [1, 99])
            assert lo - noise <= p1 and p99 <= hi + noise, f"{tissue}: 1-99% {p1:.0f}..{p99:.0f} HU"

    def test_negative_slice_has_no_blood(self):
        rng = np.random.default_rng(1)
        image = render_slice(make_head(rng), [], 2, 6, rng)
        assert not image.masks["blood"].any() and image.labels["any"] == 0

    def test_lesion_fades_at_its_ends(self):
        rng = np.random.default_rng(2)
        head = make_head(rng)
        lesion = Lesion("intraparenchymal", 70.0, 2.0, 2.0, 0.0, 1.0, 20.0, (0.45, 0.3))
        areas = [render_slice(head, [lesion], i, 6, rng).masks["intraparenchymal"].sum() for i in range(6)]
        assert areas[2] > areas[1] > areas[0] == 0 and areas[4] == 0


class TestConfig:
    def test_split_fractions(self):
        names = study_split(SynthConfig(studies=100))  # default 0.6/0.2/0.2
        assert (names.count("train"), names.count("val"), names.count("test")) == (60, 20, 20)
        names = study_split(SynthConfig(studies=100, split=(0.7, 0.15, 0.15)))
        assert (names.count("train"), names.count("val"), names.count("test")) == (70, 15, 15)

    def test_bad_config(self):
        with pytest.raises(ConfigError, match="unknown difficulty 'extreme'; choose from easy, standard, hard"):
            SynthConfig(difficulty="extreme")
        with pytest.raises(ConfigError, match="at least 3 studies"):
            SynthConfig(studies=2)

    def test_difficulty_orders_lesions(self):
        assert DIFFICULTIES["hard"].size_scale < DIFFICULTIES["standard"].size_scale < DIFFICULTIES["easy"].size_scale


class TestAcquisition:
    def test_the_scanner_shows_in_pixels_and_header(self, tmp_path):
        """Padding outside the field of view, spacing and tilt in the header, and the kernel's noise texture."""
        import datetime as dt

        from edgedx.data.synth import Acquisition, write_slice_dicom
        from edgedx.guard import Scope

        head = make_head(np.random.default_rng(4))
        sharp = Acquisition(pixel_spacing_mm=0.5, tilt_deg=15.0, kernel="sharp", padding_hu=-3024.0, streaks=True)
        soft = Acquisition(pixel_spacing_mm=0.5, tilt_deg=15.0, kernel="soft", padding_hu=-3024.0, streaks=True)
        images = {
            k: render_slice(head, [], 0, 6, np.random.default_rng(0), a) for k, a in (("sharp", sharp), ("soft", soft))
        }
        image = images["sharp"]
        assert image.hu[0, 0] == -3024.0 and image.hu[256, 256] > -1000  # corner: outside the reconstruction circle
        reference = render_slice(head, [], 0, 6, np.random.default_rng(0))
        assert image.masks["scalp"].sum() < reference.masks["scalp"].sum()  # 0.5 mm pixels: a smaller head

        def neighbour_correlation(hu: np.ndarray, mask: np.ndarray) -> float:
            inside = np.where(mask[:, :-1] & mask[:, 1:])
            a, b = hu[:, :-1][inside], hu[:, 1:][inside]
            return float(np.corrcoef(a - a.mean(), b - b.mean())[0, 1])

        white = images["soft"].masks["white"] & images["sharp"].masks["white"]
        assert neighbour_correlation(images["soft"].hu, white) > neighbour_correlation(image.hu, white) + 0.3
        path = tmp_path / "s.dcm"
        write_slice_dicom(
            path, image, seed=0, study=0, index=0, patient_id="T", study_date=dt.date(2021, 1, 1), acquisition=sharp
        )
        ds = pydicom.dcmread(path)
        assert float(ds.PixelSpacing[0]) == 0.5 and float(ds.GantryDetectorTilt) == 15.0
        assert modality_lut(ds.pixel_array, ds.RescaleSlope, ds.RescaleIntercept)[0, 0] == -3024
        assert Scope.for_training(["CT"], ["HEAD"]).violations(ds) == []  # a 15-degree tilt is still axial

    def test_scanner_variation_is_an_option_recorded_with_the_data(self, tmp_path):
        from edgedx.data import load_dataset, recorded_dataset, synthesize

        plain = synthesize(tmp_path / "plain", SynthConfig(studies=3, slices=1, seed=3))
        varied = synthesize(tmp_path / "varied", SynthConfig(studies=3, slices=1, seed=3, scanner=True))
        first = sorted(plain.rglob("*.dcm"))[0].relative_to(plain)
        a, b = pydicom.dcmread(plain / first), pydicom.dcmread(varied / first)
        assert float(a.PixelSpacing[0]) == 0.45 and "ConvolutionKernel" not in a
        assert "ConvolutionKernel" in b and not np.array_equal(a.pixel_array, b.pixel_array)
        record = load_dataset(varied).summary()
        assert record["synthetic"]["scanner"] is True
        assert recorded_dataset(record).synthetic["scanner"] is True
