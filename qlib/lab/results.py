"""Results with provenance: ``results/<notebook-stem>/metrics.json`` plus figures beside it.

Every notebook ends by writing one ``metrics.json``::

    {"notebook": "00_baselines", "metrics": {...}, "claims": [{"claim", "article", "measured", "verdict", "note"}],
     "provenance": {"git_sha", "git_dirty", "packages", "cpu", "threads", "seed", "smoke", "wall_s", ...}}

Writes are atomic (temporary file, then ``os.replace``) with the usual permissions (``0666`` less the umask),
and :class:`Run` saves partial metrics after each step (``metrics.partial.json``), so an interrupted run leaves
what it had measured beside any earlier ``metrics.json``, never a torn or half-replaced one.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from qlib.lab.paths import REPO_ROOT

VERDICTS = ("reproduced", "partly", "not reproduced", "not testable offline")
NOTEBOOK_ENV = "QLIB_NOTEBOOK"  # the runner tells the kernel which notebook it runs (the output folder may differ)

PACKAGES = (
    "torch", "transformers", "accelerate", "torchao", "numpy", "safetensors", "gguf", "onnx", "onnxruntime",
    "onnxscript", "optimum", "bitsandbytes", "gptqmodel", "llmcompressor", "scikit-learn", "aeon", "papermill",
    "matplotlib", "qlib",
)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the article, what we measured, and the verdict."""

    claim: str
    article: str
    measured: str
    verdict: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}; pick the one that fits the evidence.")
        for field in ("claim", "article", "measured"):
            if not str(getattr(self, field)).strip():
                raise ValueError(f"Claim.{field} is empty; say what the article claimed and what was measured.")


def jsonable(x: Any, digits: int | None = None) -> Any:
    """Strict-JSON copy: numpy / torch values, paths, dataclasses as plain values; non-finite floats as strings.

    ``digits`` rounds floats to that many significant digits (for short reports); None keeps them exact.
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x), digits)
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:  # numpy / torch scalar
        x = x.item()
    elif hasattr(x, "tolist") and callable(x.tolist):  # numpy array / torch tensor
        return jsonable(x.tolist(), digits)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)  # "inf", "-inf", "nan": strict JSON has no such numbers
        if digits is not None:
            return float(f"{x:.{digits}g}")
    return x


def temporary_path(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside ``path``, not yet created (so the file it becomes gets the umask's mode)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a reader sees the old file or the new one, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0644 under the usual umask, as open() gives
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    """Atomically write strict JSON (non-finite floats become strings)."""
    return atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def git_state(root: Path = REPO_ROOT) -> dict:
    """The commit the code ran at and whether the work tree had uncommitted changes."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    sha = git("rev-parse", "HEAD")
    changed = git("diff", "HEAD", "--name-only").splitlines() if sha else []
    # which tracked files differed, so a reader can tell whether the code behind the numbers did
    return {"git_sha": sha or None, "git_dirty": bool(changed) if sha else None, "git_dirty_paths": changed[:50]}


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour the numbers depend on (None = not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(*, seed: int, smoke: bool, wall_s: float | None = None, git: dict | None = None) -> dict:
    """Everything needed to tell where a number came from."""
    import torch

    from qlib.lab.bench import cpu_info

    return {
        **(git if git is not None else git_state()),   # a run passes the state it started from
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "smoke": bool(smoke),
        "wall_s": None if wall_s is None else round(wall_s, 2),
    }


def validate_claims(claims: Iterable[Claim | dict]) -> list[dict]:
    """Claims as plain dicts, each checked (a dict goes through :class:`Claim` for validation)."""
    return [dataclasses.asdict(c if isinstance(c, Claim) else Claim(**c)) for c in claims]


def write_metrics(out_dir: Path, metrics: dict, claims: Iterable[Claim | dict], *, seed: int, smoke: bool,
                  wall_s: float | None = None, notebook: str | None = None, git: dict | None = None) -> Path:
    """Write ``<out_dir>/metrics.json`` with metrics, validated claims and provenance; returns its path."""
    out_dir = Path(out_dir)
    record = {
        "notebook": notebook or notebook_name(out_dir),
        "metrics": metrics,
        "claims": validate_claims(claims),
        "provenance": provenance(seed=seed, smoke=smoke, wall_s=wall_s, git=git),
    }
    return write_json(out_dir / "metrics.json", record)


def notebook_name(out_dir: Path) -> str:
    """The notebook being run: as the runner says (``$QLIB_NOTEBOOK``), else Jupyter's session, else the folder."""
    if os.environ.get(NOTEBOOK_ENV):
        return os.environ[NOTEBOOK_ENV]
    session = os.environ.get("JPY_SESSION_NAME", "")  # Jupyter Server's path of the notebook a kernel serves
    if session.endswith(".ipynb"):
        return Path(session).stem
    return Path(out_dir).name


def read_metrics(path: Path) -> dict:
    """Load a ``metrics.json`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the notebook first (python -m qlib run {path.parent.name}).")
    return json.loads(path.read_text())


def run_parameters(executed: Path) -> dict[str, Any]:
    """The parameters an executed notebook ran with: its parameters cell's defaults, overridden by what papermill
    injected (``metadata.papermill.parameters``). Literal values only; a default that is not a literal is skipped."""
    import ast

    nb = json.loads(Path(executed).read_text())
    params: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            for node in ast.parse("".join(cell["source"])).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        params[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        pass
            break
    params.update(nb.get("metadata", {}).get("papermill", {}).get("parameters", {}))
    return params


def sibling_runs(out_dir: str | Path, notebook: str) -> list[dict[str, Any]]:
    """Finished full runs of ``notebook`` in the other folders beside ``out_dir`` (e.g. ``results/04_gptq`` and
    ``results/04_gptq_gemma3-270m``): ``{"out_dir", "metrics", "parameters"}`` each, the parameters read from the
    executed copy there (None where it is missing). Smoke runs are left out."""
    out_dir = Path(out_dir).resolve()
    found = []
    for path in sorted(out_dir.parent.glob(f"{notebook}*/metrics.json")):
        if path.parent == out_dir:
            continue
        record = json.loads(path.read_text())
        if record.get("notebook") != notebook or record.get("provenance", {}).get("smoke"):
            continue
        executed = path.parent / f"{notebook}.ipynb"
        found.append({"out_dir": path.parent, "metrics": record,
                      "parameters": run_parameters(executed) if executed.is_file() else None})
    return found


def save_figure(fig, out_dir: Path, name: str, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``<out_dir>/<name>.png`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    tmp = temporary_path(path, suffix=".png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def human_number(x: Any) -> str:
    """A number as a table cell for people: thousands separated, sensible digits, scientific notation only for
    magnitudes below 0.001 (KL of near-identical models) — never ``6.667842e+07`` or ``90867920.0``."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) or math.isinf(x):
        return str(x)
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1e5:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:,.1f}"
    if a >= 1e-3:
        return f"{x:.4g}"
    return f"{x:.2e}"


def style_tables() -> None:
    """pandas display settings for the notebooks: no column cut at 50 characters, numbers by :func:`human_number`.
    :class:`Run` applies them inside IPython, so every notebook's tables read the same."""
    try:
        import pandas as pd
    except ImportError:
        return
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", human_number)


class SavedFigure(type(Path())):
    """The path of a saved figure; IPython shows nothing for it (the figure itself is displayed)."""

    def _ipython_display_(self) -> None:
        pass


class Run:
    """One notebook run: records metrics step by step (saved as it goes) and writes the final metrics.json.

    >>> run = Run(OUT, seed=0, smoke=SMOKE)
    >>> run.log("lm", {"ppl": 60.8})        # saved to metrics.partial.json at once
    >>> run.figure(fig, "perplexity")        # results/<stem>/perplexity.png
    >>> run.finish(claims=[Claim(...)])      # metrics.json with provenance; the partial file is removed
    """

    def __init__(self, out_dir: str | Path, *, seed: int = 0, smoke: bool = False, notebook: str | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.notebook = notebook or notebook_name(self.out_dir)  # recorded in metrics.json, whatever OUT is
        self.seed, self.smoke = seed, bool(smoke)
        self.metrics: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._partial = self.out_dir / "metrics.partial.json"
        self._partial.unlink(missing_ok=True)  # an earlier stopped run's steps are not this run's
        self.git = git_state()  # the code the run started from; HEAD may move while a long run goes on
        if _in_ipython():
            style_tables()

    def log(self, key: str, value: Any) -> Any:
        """Record one result under ``key`` and save the partial metrics at once."""
        self.metrics[key] = value
        write_json(self._partial, {"metrics": self.metrics, "smoke": self.smoke, "seed": self.seed})
        return value

    def figure(self, fig, name: str) -> Path:
        """Save a figure as ``<name>.png`` next to the metrics and show that PNG in the notebook (the executed copy
        keeps it as an ``image/png`` output), then close the figure so it is not drawn twice. Returns the file's
        path, which a notebook does not print when the call ends a cell (the picture is shown instead)."""
        path = SavedFigure(save_figure(fig, self.out_dir, name))
        if _in_ipython():  # in plain Python the file is the figure
            from IPython.display import Image, display

            display(Image(filename=str(path)))
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    def finish(self, claims: Iterable[Claim | dict] = ()) -> Path:
        """Write the final metrics.json with claims and provenance."""
        path = write_metrics(self.out_dir, self.metrics, claims, seed=self.seed, smoke=self.smoke,
                             wall_s=time.perf_counter() - self.started, notebook=self.notebook, git=self.git)
        self._partial.unlink(missing_ok=True)
        return path
