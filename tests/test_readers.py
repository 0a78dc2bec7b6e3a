"""Readers: DICOM study folders, MedMNIST .npz, image folders; each bad input gets one clear error."""

from __future__ import annotations

import csv
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edgedx.data import load_dataset, read_image, read_medmnist, read_study_folder
from edgedx.errors import DataError, DicomError, LabelError


@pytest.fixture
def one_dicom(tiny_headct) -> Path:
    return next(tiny_headct.rglob("*.dcm"))


class TestDicomFile:
    def test_reads_hu(self, one_dicom):
        """Corner pixels are air (-1000 HU before noise; air gets no noise)."""
        image = read_image(one_dicom)
        assert image.shape == (512, 512) and image.dtype == np.float32
        assert image[0, 0] == -1000 and image[-1, -1] == -1000
        assert image.max() > 700  # skull

    def test_not_dicom(self, tmp_path):
        path = tmp_path / "notes.dcm"
        path.write_text("hello, not a DICOM file")
        with pytest.raises(DicomError, match=r"notes.dcm: not a DICOM file"):
            read_image(path)

    def test_truncated(self, one_dicom, tmp_path):
        path = tmp_path / "cut.dcm"
        path.write_bytes(one_dicom.read_bytes()[:300_000])
        with pytest.raises(DicomError, match=r"cut.dcm: .*truncated"):
            read_image(path)

    def test_truncated_inside_header(self, one_dicom, tmp_path):
        path = tmp_path / "head.dcm"
        path.write_bytes(one_dicom.read_bytes()[:200])
        with pytest.raises(DicomError, match=r"head.dcm: "):
            read_image(path)

    def test_missing_pixel_data(self, one_dicom, tmp_path):
        ds = pydicom.dcmread(one_dicom)
        del ds.PixelData
        ds.save_as(tmp_path / "nopix.dcm")
        with pytest.raises(DicomError, match=r"nopix.dcm: no pixel data"):
            read_image(tmp_path / "nopix.dcm")

    def test_wrong_modality(self, one_dicom, tmp_path):
        ds = pydicom.dcmread(one_dicom)
        ds.Modality = "MR"
        ds.save_as(tmp_path / "mr.dcm")
        with pytest.raises(DicomError, match=r"mr.dcm: Modality is 'MR', expected one of \['CT'\]"):
            read_image(tmp_path / "mr.dcm", modalities=["CT"])

    @pytest.mark.parametrize("syntax", [pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless])
    def test_undecodable_transfer_syntax(self, one_dicom, tmp_path, syntax):
        """Compressed pixel data that no installed decoder can read (JPEG-LS: none installed;
        JPEG 2000: Pillow tries and fails on the corrupt stream)."""
        ds = pydicom.dcmread(one_dicom)
        ds.file_meta.TransferSyntaxUID = syntax
        size = struct.pack(">IIII", ds.Columns, ds.Rows, 0, 0)  # a SIZ marker stating the header's size
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51\x00\x29\x00\x00" + size + b"\0" * 48])
        ds["PixelData"].is_undefined_length = True
        ds.save_as(tmp_path / "packed.dcm", enforce_file_format=True)
        expected = re.escape(f"packed.dcm: cannot decode pixel data in transfer syntax {syntax.name} ({syntax})")
        with pytest.raises(DicomError, match=expected):
            read_image(tmp_path / "packed.dcm")

    def test_absurd_dimensions(self, one_dicom, tmp_path):
        ds = pydicom.dcmread(one_dicom)
        ds.Rows = 60000
        ds.save_as(tmp_path / "huge.dcm")
        with pytest.raises(DicomError, match=r"huge.dcm: image is 60000 x 512"):
            read_image(tmp_path / "huge.dcm")

    def test_colour(self, one_dicom, tmp_path):
        ds = pydicom.dcmread(one_dicom)
        ds.SamplesPerPixel = 3
        ds.save_as(tmp_path / "rgb.dcm")
        with pytest.raises(DicomError, match=r"rgb.dcm: SamplesPerPixel is 3"):
            read_image(tmp_path / "rgb.dcm")


class TestStudyFolder:
    def test_reads_synthetic_folder(self, tiny_headct):
        ds = read_study_folder(tiny_headct)
        assert ds.input == "hu" and ds.class_names == ("no-any", "any")
        assert sum(len(s) for s in ds.splits.values()) == 30
        assert ds.splits["train"].read(0).shape == (512, 512)

    def _copy_with_rows(self, src: Path, dest: Path, edit) -> Path:
        shutil.copytree(src, dest)
        with open(dest / "labels.csv") as f:
            rows = list(csv.DictReader(f))
        rows, fields = edit(rows)
        with open(dest / "labels.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return dest

    def test_by_sop_uid_without_split_column(self, tiny_headct, tmp_path):
        """Any RSNA-style folder: files found by SOPInstanceUID, patients split by hash."""

        def edit(rows):
            keep = ["SOPInstanceUID", "any"]
            return [{k: r[k] for k in keep} for r in rows], keep

        folder = self._copy_with_rows(tiny_headct, tmp_path / "rsna", edit)
        patients = {}
        try:
            ds = read_study_folder(folder)
        except DataError as exc:  # a hash split may leave a split empty on 9 patients; that must say so
            assert "empty" in str(exc)
            return
        for name, split in ds.splits.items():
            for rel in split.ids:
                patients.setdefault(Path(rel).parent.name, set()).add(name)
        assert all(len(v) == 1 for v in patients.values())

    def test_missing_label(self, tiny_headct, tmp_path):
        def edit(rows):
            rows[3]["any"] = ""
            return rows, list(rows[0])

        folder = self._copy_with_rows(tiny_headct, tmp_path / "gap", edit)
        with pytest.raises(LabelError, match=r"labels.csv:5: 'any' is ''; expected 0 or 1"):
            read_study_folder(folder)

    def test_missing_file(self, tiny_headct, tmp_path):
        folder = tmp_path / "lost"
        shutil.copytree(tiny_headct, folder)
        victim = next(folder.rglob("*.dcm"))
        victim.unlink()
        with pytest.raises(LabelError, match=rf"{victim.name}, which does not exist"):
            read_study_folder(folder)

    def test_no_labels(self, tmp_path):
        (tmp_path / "a").mkdir()
        with pytest.raises(LabelError, match="no labels.csv"):
            read_study_folder(tmp_path)

    def test_unknown_target(self, tiny_headct):
        with pytest.raises(LabelError, match="no column 'bleed'"):
            read_study_folder(tiny_headct, target="bleed")

    def test_bad_file_in_folder_fails_on_read(self, tiny_headct, tmp_path):
        folder = tmp_path / "bad"
        shutil.copytree(tiny_headct, folder)
        victim = sorted(folder.rglob("*.dcm"))[0]
        victim.write_bytes(b"garbage")
        ds = read_study_folder(folder)
        split = next(s for s in ds.splits.values() if str(victim.relative_to(folder)) in s.ids)
        with pytest.raises(DicomError, match=f"{victim.name}: not a DICOM file"):
            list(split.images())


class TestMedmnist:
    def test_reads_splits(self, tiny_npz):
        ds = read_medmnist(tiny_npz)
        assert ds.input == "intensity" and ds.default_size == 16
        assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [64, 24, 24]
        assert ds.splits["test"].read(0).shape == (16, 16)

    def test_known_flavour_names(self, tmp_path, tiny_npz):
        organ = tmp_path / "organamnist.npz"
        shutil.copy(tiny_npz, organ)
        ds = read_medmnist(organ)
        assert ds.class_names[1] == "femur-left" and not ds.augmentation.hflip

    def test_missing_keys(self, tmp_path):
        np.savez(tmp_path / "x.npz", train_images=np.zeros((2, 4, 4)))
        with pytest.raises(DataError, match=r"x.npz: missing array\(s\) train_labels"):
            read_medmnist(tmp_path / "x.npz")

    def test_not_npz(self, tmp_path):
        (tmp_path / "y.npz").write_text("no")
        with pytest.raises(DataError, match="y.npz: not a readable .npz"):
            read_medmnist(tmp_path / "y.npz")

    def test_colour_refused(self, tmp_path):
        arrays = {
            f"{s}_{k}": (np.zeros((2, 4, 4, 3)) if k == "images" else np.zeros((2, 1)))
            for s in ("train", "val", "test")
            for k in ("images", "labels")
        }
        np.savez(tmp_path / "c.npz", **arrays)
        with pytest.raises(DataError, match="expected greyscale"):
            read_medmnist(tmp_path / "c.npz")

    def test_real_pneumoniamnist(self):
        from conftest import shared_file

        ds = read_medmnist(shared_file("pneumoniamnist.npz"))
        assert ds.class_names == ("normal", "pneumonia")
        assert np.bincount(ds.splits["test"].labels).tolist() == [234, 390]


class TestImageFolder:
    def _write(self, root: Path, classes: dict[str, int]) -> None:
        from PIL import Image

        for name, n in classes.items():
            (root / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 30), 25 * i, np.uint8)).save(root / name / f"{i}.png")

    def test_reads_and_splits_per_class(self, tmp_path):
        self._write(tmp_path / "imgs", {"normal": 10, "opacity": 10})
        ds = load_dataset(tmp_path / "imgs")
        assert ds.class_names == ("normal", "opacity")
        assert sum(len(s) for s in ds.splits.values()) == 20
        assert set(ds.splits["test"].labels.tolist()) == {0, 1}
        assert ds.splits["train"].read(0).shape == (20, 30)

    def test_one_class_refused(self, tmp_path):
        self._write(tmp_path / "one", {"normal": 5})
        with pytest.raises(DataError, match="need at least 2"):
            load_dataset(tmp_path / "one")

    def test_unreadable_image(self, tmp_path):
        self._write(tmp_path / "imgs", {"a": 4, "b": 4})
        (tmp_path / "imgs" / "a" / "0.png").write_bytes(b"not a png")
        ds = load_dataset(tmp_path / "imgs")
        with pytest.raises(DataError, match="0.png: not a readable image"):
            for split in ds.splits.values():
                list(split.images())


class TestLoadDataset:
    def test_dispatch(self, tiny_headct, tiny_npz):
        assert load_dataset(tiny_headct).input == "hu"
        assert load_dataset(tiny_npz).input == "intensity"

    def test_missing_path(self, tmp_path):
        with pytest.raises(DataError, match="no such file or folder"):
            load_dataset(tmp_path / "nothing")

    def test_other_file(self, tmp_path):
        (tmp_path / "a.csv").write_text("x")
        with pytest.raises(DataError, match="must be a MedMNIST .npz"):
            load_dataset(tmp_path / "a.csv")
