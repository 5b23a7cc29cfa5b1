"""The repository stays small: results hold metrics, figures and executed notebooks, never model files.

A submission over the size limit is rejected whole (one session's work was lost that way), so the limits are
checked on every file git tracks or would add (untracked files that are not ignored).
"""
import subprocess
from pathlib import Path

import pytest

from qlib.lab.paths import REPO_ROOT

MAX_FILE_BYTES = 5 * 2**20                      # one file; the largest executed notebook so far is ~1 MB
MAX_TOTAL_BYTES = 64 * 2**20                    # everything tracked together
RESULT_SUFFIXES = {".json", ".png", ".ipynb", ".md", ".csv"}
MODEL_SUFFIXES = {".onnx", ".pt", ".pth", ".bin", ".safetensors", ".gguf", ".h5", ".ckpt", ".npz", ".data"}


def _files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                         capture_output=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO_ROOT / p for p in out.stdout.decode().split("\0") if p and (REPO_ROOT / p).is_file()]


def test_no_file_is_large():
    big = [(str(p.relative_to(REPO_ROOT)), p.stat().st_size) for p in _files() if p.stat().st_size > MAX_FILE_BYTES]
    assert not big, f"files over {MAX_FILE_BYTES >> 20} MiB would bloat the submission; keep them in data/cache: {big}"


def test_total_size_is_bounded():
    total = sum(p.stat().st_size for p in _files())
    assert total < MAX_TOTAL_BYTES, f"tracked files total {total / 2**20:.1f} MiB (limit {MAX_TOTAL_BYTES >> 20} MiB)"


def test_no_model_files_are_tracked():
    models = [str(p.relative_to(REPO_ROOT)) for p in _files() if p.suffix.lower() in MODEL_SUFFIXES]
    assert not models, f"model or tensor files belong in data/cache/ or a temporary folder, not in git: {models}"


def test_results_hold_only_metrics_figures_and_notebooks():
    other = [str(p.relative_to(REPO_ROOT)) for p in _files()
             if p.is_relative_to(REPO_ROOT / "results") and p.suffix.lower() not in RESULT_SUFFIXES]
    assert not other, f"results/ holds metrics.json, figures and executed notebooks only: {other}"
