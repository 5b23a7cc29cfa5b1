"""Library logs into a file instead of the notebook: what reference libraries, bitsandbytes, ONNX Runtime and the like
print while they work goes to ``<OUT>/logs/<name>.log`` (git-ignored), and the notebook shows one summary line.

Everything a library can write through is redirected while the block runs: ``sys.stdout`` / ``sys.stderr`` (print,
tqdm bars, the ``warnings`` module), every ``logging.StreamHandler`` already attached to a logger (transformers and
others bind their stream when the handler is made), and the process's file descriptors 1 and 2 (C++ libraries such
as ONNX Runtime write there directly). Warnings are recorded once per message and place, as Python's default filter
does, so a warning repeated 20,000 times is one line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_WARNING_LINE = re.compile(r"(Warning|WARNING|WARN)\b")  # UserWarning, DeprecationWarning, "WARNING:", "WARN"


@dataclass
class CapturedLogs:
    """Where a block's library output went and how much of it there was (filled in when the block ends)."""

    path: Path
    label: str
    lines: int = 0
    warnings: int = 0

    def summary(self) -> str:
        """One line for the notebook: the label, how many lines and warnings, and the file (relative to OUT)."""
        where = Path(*self.path.parts[-2:]).as_posix()
        extra = f", {self.warnings} warning line{'s' if self.warnings != 1 else ''}" if self.warnings else ""
        return f"{self.label}: {self.lines:,} log line{'s' if self.lines != 1 else ''}{extra} → {where}"


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def capture_logs(out_dir: str | Path, name: str, label: str | None = None, show: bool = True) -> Iterator[CapturedLogs]:
    """Send everything printed or logged inside the block to ``<out_dir>/logs/<name>.log``; print one summary line.

    >>> with capture_logs(OUT, "gptqmodel") as logs:
    ...     model = reference.gptqmodel_gptq(...)
    gptqmodel: 1,874 log lines, 12 warning lines → logs/gptqmodel.log

    An exception inside the block still restores every stream, then propagates (its traceback is shown as usual).
    """
    path = Path(out_dir) / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = CapturedLogs(path, label or name)
    _flush()
    with open(path, "w", encoding="utf-8", errors="replace", buffering=1) as f:
        swapped = []
        for h in _stream_handlers():
            try:
                swapped.append((h, h.setStream(f)))
            except AttributeError:  # logging's last-resort handler: it looks sys.stderr up each time (redirected below)
                pass
            except ValueError:  # a handler whose stream was closed elsewhere: it writes nowhere, leave it
                pass
        saved_fds = []
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(f.fileno(), fd)
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), warnings.catch_warnings():
                warnings.simplefilter("default")  # each distinct warning once per place, however often it fires
                warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: f.write(
                    warnings.formatwarning(message, category, filename, lineno, line))  # whoever set it before
                yield record
        finally:
            _flush()
            f.flush()
            for fd, saved in saved_fds:
                os.dup2(saved, fd)
                os.close(saved)
            for handler, old in swapped:
                if old is not None:
                    handler.setStream(old)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    record.lines = len(lines)
    record.warnings = sum(bool(_WARNING_LINE.search(ln)) for ln in lines)
    if show:
        print(record.summary())
