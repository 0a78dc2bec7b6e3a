"""The preprocessed cache: the same inputs as scaling each image, built once, in parallel, safely."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import replace

import numpy as np
import pytest

from edgedx.data import cache as cache_module
from edgedx.data import cache_split, read_medmnist
from edgedx.data.cache import same_data
from edgedx.errors import DataError
from edgedx.preprocess import PreprocessSpec, channel_statistics, scale_and_resize

SPEC = PreprocessSpec(size=8, input="intensity")


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 10 images (8x8x1 float32), so the tiny data set spans several."""
    monkeypatch.setattr(cache_module, "SHARD_BYTES", 10 * 8 * 8 * 4)


def _entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_cached_inputs_are_the_scaled_images(tiny_npz, tmp_path, small_shards):
    dataset = read_medmnist(tiny_npz)
    cached = cache_split(dataset, "train", SPEC, root=tmp_path, workers=1)
    split = dataset.splits["train"]
    expected = np.stack([scale_and_resize(split.read(i), SPEC) for i in range(len(split))])
    assert len(cached.inputs.shard_files) == 7 and cached.inputs.shape == (64, 8, 8, 1)
    np.testing.assert_array_equal(np.asarray(cached.inputs), expected)
    np.testing.assert_array_equal(cached.y, split.labels)
    picked = [63, 0, 12, 12, 31]  # across shards, unsorted, repeated
    np.testing.assert_array_equal(cached.inputs[picked], expected[picked])
    np.testing.assert_array_equal(cached.inputs[5:25], expected[5:25])
    normalised = cached.inputs.normalised((0.25,), (2.0,))
    np.testing.assert_allclose(np.asarray(normalised), (expected - 0.25) / 2.0, rtol=1e-6)


def test_worker_processes_build_the_same_entry(tiny_npz, tmp_path, small_shards):
    dataset = read_medmnist(tiny_npz)
    alone = cache_split(dataset, "train", SPEC, root=tmp_path / "one", workers=1)
    done = []
    parallel = cache_split(
        dataset, "train", SPEC, root=tmp_path / "two", workers=2, progress=lambda d, t: done.append(d)
    )
    np.testing.assert_array_equal(np.asarray(parallel.inputs), np.asarray(alone.inputs))
    assert parallel.fingerprint == alone.fingerprint
    assert done[-1] == 64 and done == sorted(done)


@pytest.mark.parametrize(
    "key",
    [
        *(slice(5, 25), slice(None, None, -3), slice(-7, None)),
        *([63, 0, 12, 12, 31], [-1, -64], 17, -2, np.arange(64) % 3 == 0, np.empty(0, np.int64)),
    ],
)
def test_cached_inputs_index_as_numpy_does(tiny_npz, tmp_path, small_shards, key):
    cached = cache_split(read_medmnist(tiny_npz), "train", SPEC, root=tmp_path, workers=1).inputs
    np.testing.assert_array_equal(cached[key], np.asarray(cached)[key])


@pytest.mark.parametrize("key", [64, -65, [0, 64], np.ones(3, bool), [0.5]])
def test_cached_inputs_refuse_indices_numpy_refuses(tiny_npz, tmp_path, key):
    cached = cache_split(read_medmnist(tiny_npz), "train", SPEC, root=tmp_path, workers=1).inputs
    with pytest.raises(IndexError):
        np.asarray(cached)[key]
    with pytest.raises(IndexError):
        cached[key]


def test_an_entry_is_reused_without_reading_an_image(tiny_npz, tmp_path):
    dataset = read_medmnist(tiny_npz)
    first = cache_split(dataset, "val", SPEC, root=tmp_path, workers=1)

    def unreadable(i):
        raise AssertionError("read an image the cache holds")

    splits = {**dataset.splits, "val": replace(dataset.splits["val"], read=unreadable)}
    again = cache_split(replace(dataset, splits=splits), "val", SPEC, root=tmp_path, workers=1)
    assert again.fingerprint == first.fingerprint and again.inputs.shard_files == first.inputs.shard_files


def test_the_fingerprint_follows_the_pixels_and_the_labels(tiny_npz, tmp_path):
    dataset = read_medmnist(tiny_npz)
    base = cache_split(dataset, "val", SPEC, root=tmp_path, workers=1).fingerprint
    assert base == cache_split(dataset, "val", replace(SPEC, size=12), root=tmp_path, workers=1).fingerprint
    split = dataset.splits["val"]
    flipped = replace(split, labels=1 - split.labels)
    relabelled = replace(dataset, splits={**dataset.splits, "val": flipped})
    assert cache_split(relabelled, "val", SPEC, root=tmp_path, workers=1).fingerprint != base
    assert same_data(base, base) is True and same_data(base, base[:-1] + "0") is False
    assert same_data(base, "ab" * 32) is None and same_data(base, None) is None  # an older bundle's: unknown


def test_a_changed_file_makes_a_new_entry(tiny_npz, tmp_path):
    copy = tmp_path / "data.npz"
    shutil.copy(tiny_npz, copy)
    first = cache_split(read_medmnist(copy), "val", SPEC, root=tmp_path / "cache", workers=1)
    with np.load(copy) as arrays:
        changed = {k: arrays[k] for k in arrays.files}
    changed["val_images"][0] = 255 - changed["val_images"][0]
    np.savez(copy, **changed)
    os.utime(copy, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    second = cache_split(read_medmnist(copy), "val", SPEC, root=tmp_path / "cache", workers=1)
    assert second.inputs.shard_files[0].parent != first.inputs.shard_files[0].parent
    assert second.fingerprint != first.fingerprint
    assert not np.array_equal(np.asarray(second.inputs)[0], np.asarray(first.inputs)[0])


def test_an_interrupted_build_leaves_nothing_behind(tiny_npz, tmp_path, small_shards):
    dataset = read_medmnist(tiny_npz)
    split = dataset.splits["train"]

    def fails_late(i):
        if i == 40:
            raise DataError("unreadable image 40")
        return split.read(i)

    broken = replace(dataset, splits={**dataset.splits, "train": replace(split, read=fails_late)})
    with pytest.raises(DataError, match="image 40"):
        cache_split(broken, "train", SPEC, root=tmp_path, workers=1)
    assert _entries(tmp_path) == []
    cache_split(dataset, "train", SPEC, root=tmp_path, workers=1)
    assert len(_entries(tmp_path)) == 1


def test_a_dead_builders_scratch_folder_is_removed(tiny_npz, tmp_path):
    dataset = read_medmnist(tiny_npz)
    key = cache_module.cache_key(dataset.splits["val"], SPEC, dataset.source)
    dead = tmp_path / f"{key}.partial-{socket.gethostname()}-999999999-deadbeef"  # no such process here
    elsewhere = tmp_path / f"{key}.partial-another-host-999999999-deadbeef"  # a shared volume's other builder
    for scratch in (dead, elsewhere):
        scratch.mkdir(parents=True)
        (scratch / "shard-00000.npy").write_bytes(b"half a shard")
    cache_split(dataset, "val", SPEC, root=tmp_path, workers=1)
    assert _entries(tmp_path) == sorted([key, elsewhere.name])


def test_channel_statistics_over_chunks_equal_the_whole(tiny_npz):
    rng = np.random.default_rng(1)
    x = rng.random((50, 4, 4, 3), np.float32) * np.array([1.0, 0.5, 0.0], np.float32)
    mean, std = channel_statistics([x[:7], x[7:30], x[30:]])
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2), dtype=np.float64), rtol=1e-9)
    np.testing.assert_allclose(std[:2], x.std(axis=(0, 1, 2), dtype=np.float64)[:2], rtol=1e-6)
    assert std[2] == 1.0  # a flat channel


def test_a_crashed_worker_is_a_data_error_naming_the_images(tiny_npz, tmp_path, small_shards):
    dataset = read_medmnist(tiny_npz)
    split = dataset.splits["train"]

    def crashes(i):
        if i == 25:
            os._exit(1)  # a worker killed mid-shard (out of memory, a decoder crash)
        return split.read(i)

    broken = replace(dataset, splits={**dataset.splits, "train": replace(split, read=crashes)})
    with pytest.raises(DataError, match=r"npz:.*ended abruptly"):
        cache_split(broken, "train", SPEC, root=tmp_path, workers=2)
    assert _entries(tmp_path) == []
