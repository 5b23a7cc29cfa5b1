"""Execute notebooks headlessly with papermill.

    python -m qlib run                 # every notebook, full size, executed copies + metrics into results/<stem>/
    python -m qlib run --smoke         # every notebook with SMOKE=True into .smoke/<stem>/ (git-ignored)
    python -m qlib run 00 04_gptq      # some notebooks, by number or stem
    python -m qlib run 00 -p WINDOW=256  # extra parameters (parsed as Python literals, else strings)

A failing cell is reported by notebook and cell; the other notebooks still run, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time
from pathlib import Path

from qlib.lab.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SMOKE_DIR = REPO_ROOT / ".smoke"
RESULTS_DIR = REPO_ROOT / "results"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}


@dataclasses.dataclass
class Outcome:
    """How one notebook run ended."""

    notebook: str
    ok: bool
    seconds: float
    output: Path
    error: str = ""


def discover(selectors: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Notebooks named ``NN_slug.ipynb`` in order; selectors match a number prefix or a stem."""
    found = sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if not selectors:
        return found
    chosen = []
    for sel in selectors:
        stem = Path(sel).stem
        hits = [p for p in found if p.stem == stem or p.stem.split("_")[0] == stem]
        if not hits:
            names = ", ".join(p.stem for p in found) or "none"
            raise SystemExit(f"No notebook matches {sel!r}; available: {names}.")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def describe_failure(exc: BaseException, output: Path) -> str:
    """One line naming the failing cell (1-based, as in the source notebook) and the exception."""
    cell = "?"
    try:
        import nbformat

        nb = nbformat.read(output, as_version=4)
        added = {"injected-parameters", "papermill-error-cell-tag"}  # cells papermill inserts
        source_cells = [c for c in nb.cells if not added & set(c.metadata.get("tags", []))]
        for i, c in enumerate(source_cells, 1):
            if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", [])):
                first = next((ln for ln in c.source.splitlines() if ln.strip()), "")
                cell = f"{i} ({first[:60]!r})"
                break
    except Exception:  # the executed copy may not exist if the kernel never started
        pass
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = str(getattr(exc, "evalue", exc)).strip().splitlines()
    return f"cell {cell}: {ename}: {evalue[-1] if evalue else ''}"


def run_notebook(path: Path, *, smoke: bool, out_root: Path | None = None, parameters: dict | None = None,
                 progress: bool = True, timeout: int | None = None) -> Outcome:
    """Execute one notebook; its executed copy and results go to ``<out_root>/<stem>/``."""
    import papermill as pm

    out_root = Path(out_root or (SMOKE_DIR if smoke else RESULTS_DIR))
    out_dir = out_root / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / path.name
    params = {"SMOKE": smoke, "OUT": str(out_dir), **(parameters or {})}
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(output), parameters=params, kernel_name="python3",
                            progress_bar=progress, cwd=str(path.parent), execution_timeout=timeout,
                            request_save_on_cell_execute=True)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        return Outcome(path.stem, False, time.perf_counter() - start, output, describe_failure(exc, output))
    return Outcome(path.stem, True, time.perf_counter() - start, output)


def parse_param(text: str) -> tuple[str, object]:
    """``NAME=value`` with value parsed as a Python literal when it is one."""
    if "=" not in text:
        raise SystemExit(f"Parameter {text!r} is not NAME=value.")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlib run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="numbers or stems (default: all)")
    ap.add_argument("--smoke", action="store_true", help="SMOKE=True, outputs into .smoke/")
    ap.add_argument("--out", type=Path, help="output root (default: results/, or .smoke/ with --smoke)")
    ap.add_argument("-p", "--param", action="append", default=[], help="extra notebook parameter NAME=value")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    args = ap.parse_args(argv)

    paths = discover(args.notebooks)
    params = dict(parse_param(p) for p in args.param)
    mode = "smoke" if args.smoke else "full"
    outcomes = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ({mode})", flush=True)
        outcome = run_notebook(path, smoke=args.smoke, out_root=args.out, parameters=params, timeout=args.timeout)
        status = "ok" if outcome.ok else f"FAILED in {outcome.error}"
        print(f"    {status} — {outcome.seconds:.0f} s → {outcome.output.relative_to(REPO_ROOT) if outcome.output.is_relative_to(REPO_ROOT) else outcome.output}", flush=True)
        outcomes.append(outcome)
    failed = [o for o in outcomes if not o.ok]
    print(f"notebooks run: {len(outcomes) - len(failed)} ok, {len(failed)} failed")
    for o in failed:
        print(f"  {o.notebook}.ipynb: {o.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
