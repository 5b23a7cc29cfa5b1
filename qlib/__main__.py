"""``python -m qlib COMMAND ...``: the lab's command line.

    python -m qlib run [NN ...] [--smoke] [-p NAME=VALUE]   execute notebooks (qlib.lab.run)
    python -m qlib fetch [--check]                          fetch and verify the offline sources (qlib.lab.fetch)
    python -m qlib report                                   results/REPORT.md from every metrics.json (qlib.analysis.report)
    python -m qlib doctor [--json]                          which quantization backends work here (qlib.tools.doctor)
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"run": "qlib.lab.run", "fetch": "qlib.lab.fetch", "report": "qlib.analysis.report",
            "doctor": "qlib.tools.doctor"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m qlib: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[command]).main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
