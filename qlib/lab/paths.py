"""Where qlib keeps things: the repo root, the cache of fetched sources and built models, results."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$QLIB_CACHE``, else ``<repo>/data/cache``), created on demand."""
    root = Path(os.environ.get("QLIB_CACHE") or REPO_ROOT / "data" / "cache")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(*parts: str) -> Path:
    """``<repo>/results/...``, created on demand."""
    path = REPO_ROOT.joinpath("results", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
