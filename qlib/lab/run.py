"""Execute notebooks headlessly with papermill.

    python -m qlib run                 # every notebook, full size, executed copies + metrics into results/<stem>/
    python -m qlib run --force         # the same, also notebooks an earlier run completed with the same code
    python -m qlib run --smoke         # every notebook with SMOKE=True into .smoke/<stem>/ (git-ignored)
    python -m qlib run 00 04_gptq      # some notebooks, by number, stem or path
    python -m qlib run 00 -p WINDOW=256  # parameters of the notebook's `parameters` cell (Python literals, else strings)

A failing cell is reported by notebook and cell; the other notebooks still run, and the exit code is 1.
A `-p` name that is not in the notebook's `parameters` cell, or a value of another type than its default, is
refused before anything runs.

Stopping: Ctrl-C (SIGINT), SIGTERM or SIGHUP interrupts the running cell, shuts the kernel down and ends every
process it started, within seconds; the runner names the notebook and cell it stopped and exits 130 (SIGTERM:
143, SIGHUP: 129). What the notebook had logged stays in ``metrics.partial.json`` beside any earlier
``metrics.json``, which is never replaced by a partial one (nor is an earlier executed copy: an unfinished run's
copy is ``<stem>.partial.ipynb``). The runner sets these handlers itself, so a runner started in the background
by a script (where the shell makes it ignore SIGINT) stops on SIGINT too. A second Ctrl-C while the kernel
shuts down is noted and waits for the shutdown to finish.

Resuming: a full run that completes is recorded in a ledger in the cache (``<cache>/runs/ledger.json``), keyed
by a hash of the notebook's cells, every ``qlib/**/*.py``, ``requirements.lock`` and the parameters. The next
``python -m qlib run`` skips a notebook whose key is unchanged and whose ``metrics.json`` is the one that run
wrote, and runs the rest; ``--force`` runs everything. Smoke runs never use the ledger: they are the tests,
minutes long, and should always execute the code as it is now.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from qlib import OFFLINE_ENV
from qlib.lab.paths import REPO_ROOT, cache_dir
from qlib.lab.results import NOTEBOOK_ENV, atomic_write_text

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SMOKE_DIR = REPO_ROOT / ".smoke"
RESULTS_DIR = REPO_ROOT / "results"
KERNEL_ENV = {"MPLBACKEND": "Agg",  # kernels save figures to files (shown inline as PNGs) and never open a window
              "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no "Loading weights" bars in executed notebooks
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SHUTDOWN_GRACE_S = 4.0              # a stopped kernel gets this long to exit (half after SIGTERM), then SIGKILL


@dataclasses.dataclass
class Outcome:
    """How one notebook run ended."""

    notebook: str
    ok: bool
    seconds: float
    output: Path
    error: str = ""
    out_dir: Path | None = None     # the notebook's OUT: metrics.json and figures


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal; ``where`` names the notebook and cell that were running."""

    def __init__(self, signum: int, where: str = "", out_dir: Path | None = None):
        super().__init__(signum, where)
        self.signum, self.where, self.out_dir = signum, where, out_dir

    @property
    def signame(self) -> str:
        """SIGINT, SIGTERM, ..."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 128 + its number."""
        return 128 + self.signum


# ------------------------------------------------------------------------------------------------ signals
_stopping: list[int] = []  # signals received since stop_on_signals began; the first one raised Stopped


def _on_stop_signal(signum: int, frame: Any) -> None:
    """The first stop signal raises :class:`Stopped`; later ones only say the shutdown is under way."""
    _stopping.append(signum)
    if len(_stopping) == 1:
        raise Stopped(signum)
    print(f"    {signal.Signals(signum).name}: still shutting the kernel down (a few seconds) ...",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Stopped` (also where the shell made us ignore SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stopping.clear()
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------------ notebooks
def discover(selectors: list[str] | None = None, notebook_dir: Path | None = None) -> list[Path]:
    """Notebooks named ``NN_slug.ipynb`` in order; selectors match a number prefix, a stem or a notebook's path."""
    found = sorted(p for p in Path(notebook_dir or NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb"))
    if not selectors:
        return found
    chosen: list[Path] = []
    for sel in selectors:
        if sel.endswith(".ipynb") and Path(sel).is_file():
            hits = [Path(sel).resolve()]
        else:
            stem = Path(sel).stem
            hits = [p for p in found if p.stem == stem or p.stem.split("_")[0] == stem]
        if not hits:
            names = ", ".join(p.stem for p in found) or "none"
            raise SystemExit(f"No notebook matches {sel!r}; available: {names}.")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def _read_notebook(path: Path) -> dict:
    """The notebook's JSON (nbformat 4)."""
    return json.loads(Path(path).read_text())


def _source(cell: dict) -> str:
    """A cell's source as one string (nbformat stores a string or a list of lines)."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _parameters_index(nb: dict) -> int | None:
    """Index of the cell tagged ``parameters`` (None if there is none)."""
    return next((i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])), None)


_UNKNOWN = object()  # a default that is not a literal: any value is accepted
_LITERAL_NODES = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Tuple, ast.List, ast.Dict, ast.Set,
                  ast.Load, ast.operator, ast.unaryop)


def _default_value(node: ast.expr) -> Any:
    """The value of a default written as a literal or arithmetic on literals (``300 + 40 * 100``), else _UNKNOWN."""
    tree = ast.Expression(node)
    if not all(isinstance(n, _LITERAL_NODES) for n in ast.walk(tree)):
        return _UNKNOWN
    try:
        return eval(compile(tree, "<parameters>", "eval"), {"__builtins__": {}})  # constants and operators only
    except Exception:  # e.g. 1 / 0: not a value we can compare types with
        return _UNKNOWN


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The names assigned in the notebook's ``parameters`` cell and their defaults (in order)."""
    nb = _read_notebook(path)
    index = _parameters_index(nb)
    if index is None:
        return {}
    params: dict[str, Any] = {}
    for stmt in ast.parse(_source(nb["cells"][index])).body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                params[target.id] = _default_value(stmt.value) if stmt.value is not None else _UNKNOWN
    return params


def _fits(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``default``: same type; None and non-literal defaults take anything;
    an int is a float; a list and a tuple stand for each other."""
    if default is None or default is _UNKNOWN:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(path: Path, overrides: dict[str, Any]) -> None:
    """Refuse (SystemExit, one sentence) a name that is not in the notebook's parameters cell or a value of the wrong type."""
    params = notebook_parameters(path)
    valid = ", ".join(params) or "none (it has no cell tagged 'parameters')"
    for name, value in overrides.items():
        if name not in params:
            raise SystemExit(f"{path.stem} has no parameter {name!r}; its parameters are: {valid}.")
        default = params[name]
        if not _fits(default, value):
            hint = " (quote a string: -p 'NAME=\"text\"')" if isinstance(default, str) else ""
            raise SystemExit(f"{path.stem}'s parameter {name} takes a value of type {type(default).__name__} (default "
                             f"{default!r}), not {type(value).__name__} ({value!r}){hint}; its parameters are: {valid}.")


def notebook_run_parameters(path: Path, *, smoke: bool, out_root: Path | None = None,
                            parameters: dict | None = None) -> tuple[Path, dict[str, Any]]:
    """The runner's output folder for ``path`` and the parameters it passes (SMOKE, OUT, then the overrides).

    OUT is ``<out_root>/<stem>``, injected relative to the notebook's folder when it lies inside the repository (the
    executed copy then names no path of the machine that ran it). ``-p OUT=...`` (relative to the notebook's
    folder, as in its parameters cell) moves the whole output, executed copy included: ``-p
    OUT=../results/04_gptq_gemma3-270m`` keeps a second model's run beside the default one.
    """
    parameters = dict(parameters or {})
    if "OUT" in parameters:
        out_dir = (Path(path).parent / str(parameters.pop("OUT"))).resolve()
    else:
        out_dir = (Path(out_root or (SMOKE_DIR if smoke else RESULTS_DIR)) / path.stem).resolve()
    notebook_dir = Path(path).parent.resolve()
    shown = os.path.relpath(out_dir, notebook_dir) if out_dir.is_relative_to(REPO_ROOT) else str(out_dir)
    return out_dir, {"SMOKE": smoke, "OUT": shown, **parameters}


def metrics_dir(path: Path, params: dict[str, Any]) -> Path:
    """Where the notebook writes metrics.json: its OUT, relative to the notebook's folder (its working directory)."""
    return (Path(path).parent / str(params["OUT"])).resolve()


def _cell_label(source: dict, executed_index: int, text: str) -> str:
    """``cell N ('first line')`` numbered as in the source notebook (papermill inserts a cell after `parameters`)."""
    p = _parameters_index(source)
    injected = 0 if p is None else p + 1
    if executed_index == injected:
        return "the injected parameters cell"
    number = executed_index + (1 if executed_index < injected else 0)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return f"cell {number} ({first[:60]!r})"


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


# ------------------------------------------------------------------------------------------------ kernels
def _kernel_manager(kernel_name: str):
    """An AsyncKernelManager that remembers the clients made for it (so the runner can close their channels)."""
    from jupyter_client.manager import AsyncKernelManager

    class TrackingKernelManager(AsyncKernelManager):
        def client(self, **kwargs):
            kc = super().client(**kwargs)
            self.__dict__.setdefault("qlib_clients", []).append(kc)
            return kc

    return TrackingKernelManager(kernel_name=kernel_name)


def _kernel_family(pid: int | None) -> list:
    """The kernel process and everything it started (psutil processes), as of now."""
    import psutil

    if not pid:
        return []
    try:
        kernel = psutil.Process(pid)
        return [kernel, *kernel.children(recursive=True)]
    except psutil.Error:
        return []


def _cancel_pending_tasks() -> None:
    """Cancel the tasks an interrupted nbclient left in the event loop, and collect how they ended."""
    from jupyter_core.utils import ensure_event_loop

    loop = ensure_event_loop()
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=2))
    for task in pending:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not print it as never retrieved


def shutdown_kernel(km, *, interrupt: bool = False) -> None:
    """Stop a kernel and every process it started: interrupt, ask it to exit, SIGTERM, then SIGKILL what is left."""
    import psutil
    from jupyter_core.utils import run_sync

    provisioner = getattr(km, "provisioner", None)
    pid, pgid = getattr(provisioner, "pid", None), getattr(provisioner, "pgid", None)
    family = _kernel_family(pid)  # before the kernel goes: its children are re-parented when it exits
    try:
        _cancel_pending_tasks()
        if km.has_kernel:
            if interrupt:  # the running cell ends with KeyboardInterrupt, so its finally blocks run
                run_sync(km.interrupt_kernel)()
                time.sleep(0.5)
            km.shutdown_wait_time = SHUTDOWN_GRACE_S
            run_sync(km.shutdown_kernel)(now=False)  # interrupt, shutdown_request, SIGTERM, SIGKILL (process group)
    except Exception:  # a kernel that died or never started; the sweep below still ends every process
        pass
    finally:
        for kc in km.__dict__.get("qlib_clients", []):
            with contextlib.suppress(Exception):
                kc.stop_channels()
        if pgid:
            with contextlib.suppress(OSError):  # the group is gone once all its processes are
                os.killpg(pgid, signal.SIGKILL)
        for proc in family:  # processes that left the kernel's group (their own session)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(family, timeout=3)


def run_notebook(path: Path, *, smoke: bool, out_root: Path | None = None, parameters: dict | None = None,
                 progress: bool = True, timeout: int | None = None) -> Outcome:
    """Execute one notebook; its executed copy and results go to ``<out_root>/<stem>/``.

    A signal or KeyboardInterrupt stops it: the kernel and its processes are shut down and :class:`Stopped`
    names the cell. The executed copy is ``<stem>.ipynb`` once the notebook completed, ``<stem>.partial.ipynb``
    while it runs and after a failure or a stop (an earlier complete copy is left as it was).
    """
    import papermill as pm
    from jupyter_core.utils import run_sync

    out_dir, params = notebook_run_parameters(path, smoke=smoke, out_root=out_root, parameters=parameters)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, partial = out_dir / path.name, out_dir / f"{path.stem}.partial.ipynb"
    source = _read_notebook(path)
    running: dict[str, Any] = {}

    def on_cell_start(cell, cell_index: int, **_: Any) -> None:
        running.update(index=cell_index, text=cell.source)

    env = {**OFFLINE_ENV, **KERNEL_ENV, **os.environ, NOTEBOOK_ENV: path.stem}
    km = _kernel_manager("python3")
    start = time.perf_counter()
    try:
        run_sync(km.start_kernel)(env=env, cwd=str(path.parent),  # history in memory, as nbclient starts kernels
                                  extra_arguments=["--HistoryManager.hist_file=:memory:"])
        pm.execute_notebook(str(path), str(partial), parameters=params, kernel_name="python3", km=km,
                            progress_bar=progress, cwd=str(path.parent), execution_timeout=timeout,
                            request_save_on_cell_execute=True, on_cell_start=on_cell_start)
    except KeyboardInterrupt as exc:  # Stopped (a signal) or a plain Ctrl-C in a library caller
        shutdown_kernel(km, interrupt=True)
        where = f"{path.name}, " + (_cell_label(source, running["index"], running["text"])
                                    if running else "while the kernel started")
        raise Stopped(getattr(exc, "signum", signal.SIGINT), where, metrics_dir(path, params)) from None
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        shutdown_kernel(km)
        return Outcome(path.stem, False, time.perf_counter() - start, partial, describe_failure(exc, partial),
                       metrics_dir(path, params))
    seconds = time.perf_counter() - start
    shutdown_kernel(km)
    tidy_executed(partial)
    os.replace(partial, final)
    return Outcome(path.stem, True, seconds, final, out_dir=metrics_dir(path, params))


_CARRIAGE = re.compile(r"[^\n]*\r(?=[^\n])")  # text a later \r on the same line overwrote (a progress bar's old states)


def tidy_stream_text(text: str, root: Path = REPO_ROOT) -> str:
    """A stream's text as a terminal would leave it (each line's last ``\r`` state only), with the repository's
    absolute path written as ``.`` so the executed copy names no path of the machine that ran it."""
    text = _CARRIAGE.sub("", text.replace("\r\n", "\n"))
    return text.replace(str(root) + "/", "./").replace(str(root), ".")


def tidy_executed(path: Path, root: Path = REPO_ROOT) -> dict[str, int]:
    """Tidy an executed notebook in place: consecutive stream outputs of one cell and stream name merged into one,
    progress-bar states collapsed to their last, and the repository path made relative in streams, tracebacks and
    plain-text results. Returns counts of what changed."""
    nb = json.loads(Path(path).read_text())
    merged = 0
    for cell in nb.get("cells", []):
        outputs = cell.get("outputs")
        if not outputs:
            continue
        tidy: list[dict] = []
        for out in outputs:
            if out.get("output_type") == "stream":
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                if tidy and tidy[-1].get("output_type") == "stream" and tidy[-1]["name"] == out["name"]:
                    tidy[-1]["text"] += text
                    merged += 1
                    continue
                out = {**out, "text": text}
            elif out.get("output_type") == "error":
                out = {**out, "traceback": [tidy_stream_text(t, root) for t in out.get("traceback", [])],
                       "evalue": tidy_stream_text(out.get("evalue", ""), root)}
            elif "text/plain" in out.get("data", {}):
                plain = out["data"]["text/plain"]
                plain = "".join(plain) if isinstance(plain, list) else plain
                out = {**out, "data": {**out["data"], "text/plain": tidy_stream_text(plain, root)}}
            tidy.append(out)
        for out in tidy:
            if out.get("output_type") == "stream":
                out["text"] = tidy_stream_text(out["text"], root)
        cell["outputs"] = tidy
    pm = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):  # papermill records where it read and wrote the notebook
        if isinstance(pm.get(key), str):
            pm[key] = tidy_stream_text(pm[key], root)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return {"stream_outputs_merged": merged}


# ------------------------------------------------------------------------------------------------ ledger
def ledger_path() -> Path:
    """The ledger of completed full runs, in the git-ignored cache."""
    return cache_dir("runs") / "ledger.json"


def code_digest(root: Path = REPO_ROOT) -> str:
    """sha256 of every ``qlib/**/*.py`` (paths and contents) and ``requirements.lock``."""
    h = hashlib.sha256()
    for f in sorted((root / "qlib").rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    lock = root / "requirements.lock"
    h.update(b"requirements.lock\0" + (lock.read_bytes() if lock.exists() else b""))
    return h.hexdigest()


def run_key(path: Path, params: dict[str, Any], code: str) -> str:
    """The ledger key of one run: the notebook's cells, the code digest and the parameters."""
    cells = [[c.get("cell_type"), _source(c)] for c in _read_notebook(path)["cells"]]
    payload = json.dumps({"cells": cells, "code": code, "parameters": params}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


def _file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes (None if it does not exist)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def read_ledger(path: Path | None = None) -> dict[str, dict]:
    """Ledger entries by metrics folder ({} when there is none yet, or it cannot be read)."""
    try:
        data = json.loads(Path(path or ledger_path()).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def completed_entry(out_dir: Path, key: str) -> dict | None:
    """The ledger's entry for ``out_dir`` if a run with ``key`` completed there and its metrics.json is unchanged."""
    entry = read_ledger().get(str(out_dir))
    if not entry or entry.get("key") != key:
        return None
    if entry.get("metrics_sha256") is None or _file_sha256(out_dir / "metrics.json") != entry["metrics_sha256"]:
        return None
    return entry


def record_completed(notebook: str, out_dir: Path, key: str, seconds: float) -> None:
    """Add a completed full run to the ledger (under a lock; the file is replaced atomically)."""
    path = ledger_path()
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = read_ledger(path)
        ledger[str(out_dir)] = {
            "notebook": notebook, "key": key, "metrics_sha256": _file_sha256(out_dir / "metrics.json"),
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
        }
        atomic_write_text(path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ command line
def parse_param(text: str) -> tuple[str, object]:
    """``NAME=value`` with value parsed as a Python literal when it is one."""
    if "=" not in text:
        raise SystemExit(f"Parameter {text!r} is not NAME=value.")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _shown(path: Path) -> Path:
    """A path relative to the repo when it is inside it."""
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlib run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="numbers, stems or paths (default: all)")
    ap.add_argument("--smoke", action="store_true", help="SMOKE=True, outputs into .smoke/")
    ap.add_argument("--out", type=Path, help="output root (default: results/, or .smoke/ with --smoke)")
    ap.add_argument("-p", "--param", action="append", default=[], help="notebook parameter NAME=value")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    ap.add_argument("--force", action="store_true", help="run notebooks the ledger says completed with this code")
    args = ap.parse_args(argv)

    paths = discover(args.notebooks)
    overrides = dict(parse_param(p) for p in args.param)
    for path in paths:  # before anything runs
        check_parameters(path, overrides)
    mode = "smoke" if args.smoke else "full"
    use_ledger = not args.smoke
    code = code_digest() if use_ledger else ""
    outcomes: list[Outcome] = []
    skipped = 0
    with stop_on_signals():
        try:
            for i, path in enumerate(paths, 1):
                _, params = notebook_run_parameters(path, smoke=args.smoke, out_root=args.out, parameters=overrides)
                key = run_key(path, params, code) if use_ledger else ""
                done = completed_entry(metrics_dir(path, params), key) if use_ledger and not args.force else None
                if done:
                    skipped += 1
                    print(f"[{i}/{len(paths)}] {path.name}: skipped, completed {done['finished_utc']} with this code, "
                          f"lock file and parameters (--force runs it again)", flush=True)
                    continue
                print(f"[{i}/{len(paths)}] {path.name} ({mode})", flush=True)
                outcome = run_notebook(path, smoke=args.smoke, out_root=args.out, parameters=overrides,
                                       timeout=args.timeout)
                status = "ok" if outcome.ok else f"FAILED in {outcome.error}"
                print(f"    {status} — {outcome.seconds:.0f} s → {_shown(outcome.output)}", flush=True)
                outcomes.append(outcome)
                if outcome.ok and use_ledger:
                    record_completed(path.stem, outcome.out_dir, key, outcome.seconds)
        except Stopped as stop:
            where = stop.where or "between notebooks"
            partial = stop.out_dir / "metrics.partial.json" if stop.out_dir else None
            kept = f"; measured so far: {_shown(partial)}" if partial and partial.exists() else ""
            resume = " Run the same command to resume: notebooks completed before are skipped." if use_ledger else ""
            print(f"stopped by {stop.signame} in {where}; kernel shut down{kept}.{resume}", file=sys.stderr, flush=True)
            return stop.exit_code
    failed = [o for o in outcomes if not o.ok]
    print(f"notebooks run: {len(outcomes) - len(failed)} ok, {len(failed)} failed"
          + (f", {skipped} skipped (completed earlier)" if skipped else ""))
    for o in failed:
        print(f"  {o.notebook}.ipynb: {o.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
