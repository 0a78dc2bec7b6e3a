"""Preprocessing: known HU in, known values out."""

from __future__ import annotations

import numpy as np
import pytest

from edgedx.errors import ConfigError, DataError
from edgedx.preprocess import (
    WINDOW_PRESETS,
    PreprocessSpec,
    Window,
    modality_lut,
    pad_to_square,
    parse_windows,
    resize_area,
    stack_windows,
    to_model_input,
    window,
)


class TestModalityLut:
    def test_ct_intercept(self):
        """Stored 0 with intercept -1024 is air, stored 1064 is 40 HU."""
        stored = np.array([[0, 1064], [1024, 2024]], np.int16)
        np.testing.assert_array_equal(modality_lut(stored, 1, -1024), [[-1024, 40], [0, 1000]])

    def test_slope(self):
        assert modality_lut(np.array([10], np.uint16), 2.5, -5)[0] == pytest.approx(20.0)


class TestWindow:
    def test_brain_window_values(self):
        """Brain window 40/80 spans 0..80 HU."""
        hu = np.array([-1000, 0, 20, 40, 60, 80, 1000], np.float32)
        np.testing.assert_allclose(window(hu, 40, 80), [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-6)

    def test_presets(self):
        assert (WINDOW_PRESETS["subdural"].center, WINDOW_PRESETS["subdural"].width) == (80, 200)
        assert (WINDOW_PRESETS["bone"].center, WINDOW_PRESETS["bone"].width) == (600, 2800)

    def test_stack_three_windows(self):
        """Blood at 70 HU in brain, subdural and bone windows."""
        out = stack_windows(np.full((2, 2), 70.0), parse_windows("brain,subdural,bone"))
        assert out.shape == (2, 2, 3)
        np.testing.assert_allclose(out[0, 0], [0.875, 0.45, (70 + 800) / 2800], atol=1e-6)

    def test_custom_and_unknown_windows(self):
        assert parse_windows("35/70") == (Window("35/70", 35.0, 70.0),)
        with pytest.raises(ConfigError, match=r"unknown window 'lung'; choose from brain, subdural, bone"):
            parse_windows("lung")
        with pytest.raises(ConfigError, match="width must be > 0"):
            parse_windows("40/0")


class TestResize:
    def test_integer_factor_is_block_mean(self):
        x = np.arange(16, dtype=np.float32).reshape(4, 4)
        np.testing.assert_allclose(resize_area(x, 2), [[2.5, 4.5], [10.5, 12.5]])

    def test_block_means_of_every_layout_match_exact_means(self):
        """512 -> 64 in 2-D, channels-last and the planar layout stack_windows returns: the float64
        block means to float32 precision, as in every earlier version of this function."""
        rng = np.random.default_rng(1)
        planar = rng.uniform(-1000, 3000, (3, 512, 384)).astype(np.float32)
        exact = planar.astype(np.float64).reshape(3, 64, 8, 48, 8).mean(axis=(2, 4))
        for image, expected in (
            (planar[0], exact[0]),
            (np.moveaxis(planar, 0, -1), np.moveaxis(exact, 0, -1)),  # a view of the planes
            (np.ascontiguousarray(np.moveaxis(planar, 0, -1)), np.moveaxis(exact, 0, -1)),
        ):
            out = resize_area(image, 64, 48)
            assert out.dtype == np.float32 and out.shape == expected.shape
            np.testing.assert_allclose(out, expected, rtol=0, atol=3000 * 2e-7)

    def test_fractional_factor_keeps_mean_and_constants(self):
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (28, 28)).astype(np.float32)
        assert resize_area(x, 12).mean() == pytest.approx(x.mean(), abs=1e-5)
        np.testing.assert_allclose(resize_area(np.full((7, 5, 2), 3.0), 4, 3), 3.0, atol=1e-6)

    def test_upsample(self):
        np.testing.assert_allclose(resize_area(np.array([[0.0, 1.0]]), 1, 4), [[0, 0, 1, 1]])

    def test_pad_to_square_centres(self):
        out = pad_to_square(np.ones((2, 4), np.float32), -1024)
        assert out.shape == (4, 4) and out[0, 0] == -1024 and out[1, 0] == 1 and out[3, 3] == -1024


class TestSpec:
    def test_to_model_input_replays_hu_pipeline(self):
        """512x512 of 40 HU in the brain window is 0.5 everywhere, then normalised."""
        spec = PreprocessSpec(size=8, windows=parse_windows("brain"), mean=(0.25,), std=(0.5,))
        out = to_model_input(np.full((512, 512), 40.0), spec)
        assert out.shape == (8, 8, 1) and out.dtype == np.float32
        np.testing.assert_allclose(out, 0.5, atol=1e-6)

    def test_intensity_input(self):
        spec = PreprocessSpec(size=4, input="intensity")
        image = np.kron(np.array([[0, 255], [255, 51]], np.uint8), np.ones((2, 2), np.uint8))
        out = to_model_input(image, spec)
        np.testing.assert_allclose(out[::2, ::2, 0], [[0, 1], [1, 0.2]], atol=1e-6)

    def test_dict_round_trip(self):
        spec = PreprocessSpec(size=64, windows=parse_windows("brain,bone"), mean=(0.1, 0.2), std=(0.3, 0.4))
        assert PreprocessSpec.from_dict(spec.to_dict()) == spec

    def test_validation(self):
        with pytest.raises(ConfigError, match="needs at least one window"):
            PreprocessSpec(size=64)
        with pytest.raises(ConfigError, match="input size must be between 4 and 2048"):
            PreprocessSpec(size=2, input="intensity")
        with pytest.raises(ConfigError, match="mean has 2 values for 1 channels"):
            PreprocessSpec(size=8, input="intensity", mean=(0.0, 0.0), std=(1.0, 1.0))
        with pytest.raises(ConfigError, match="malformed"):
            PreprocessSpec.from_dict({"size": 8})

    def test_bad_images(self):
        spec = PreprocessSpec(size=4, input="intensity")
        with pytest.raises(DataError, match="expected a 2-D greyscale image"):
            to_model_input(np.zeros((4, 4, 3)), spec)
        with pytest.raises(DataError, match="NaN"):
            to_model_input(np.full((4, 4), np.nan), spec)
