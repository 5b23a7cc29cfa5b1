"""The claims-vs-measured report: ``results/REPORT.md`` from every ``results/*/metrics.json``.

    python -m qlib report                    # results/REPORT.md (+ results/pareto.png when notebooks recorded points)
    python -m qlib report --include-smoke    # also smoke runs, marked as such
    python -m qlib report --results DIR --out FILE

Full runs only by default: a smoke run's numbers come from toy sizes and are not results. The output
depends only on the metrics files (no generation time), so re-running on the same results gives the same file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from qlib.lab.paths import REPO_ROOT
from qlib.lab.results import VERDICTS, atomic_write_text

RESULTS_DIR = REPO_ROOT / "results"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
FIGURE_NAME = "pareto"


def _cell(x: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(x if x is not None else "").replace("|", "\\|").replace("\r", "").replace("\n", "<br>").strip()


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to the folder ``start`` (where the report lives), with forward slashes."""
    return Path(os.path.relpath(path, start)).as_posix()


def load_runs(results_dir: Path) -> tuple[list[dict], dict[str, str]]:
    """Every readable ``<stem>/metrics.json`` (sorted by folder) and ``{stem: problem}`` for unreadable ones."""
    runs, problems = [], {}
    for path in sorted(results_dir.glob("*/metrics.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems[path.parent.name] = f"unreadable metrics.json ({type(exc).__name__}); re-run the notebook"
            continue
        record["_dir"] = path.parent
        record.setdefault("notebook", path.parent.name)
        runs.append(record)
    return runs, problems


def _is_smoke(run: dict) -> bool:
    return bool(run.get("provenance", {}).get("smoke"))


def _wall(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _notebook_link(run: dict, report_dir: Path) -> str:
    """Link to the executed notebook beside the metrics, else to the metrics file."""
    stem, folder = run["notebook"], run["_dir"]
    target = folder / f"{folder.name}.ipynb"
    if not target.exists():
        target = folder / "metrics.json"
    return f"[{stem}]({_rel(target, report_dir)})"


def _claims_section(runs: list[dict], report_dir: Path) -> list[str]:
    counts = Counter()
    rows = []
    for run in runs:
        tag = " (smoke)" if _is_smoke(run) else ""
        for c in run.get("claims", []):
            counts[c.get("verdict")] += 1
            rows.append([len(rows) + 1, c.get("claim"), c.get("article"), c.get("measured"), c.get("verdict"),
                         _notebook_link(run, report_dir) + tag, c.get("note", "")])
    lines = ["## Verdicts", ""]
    known = [[v, counts.get(v, 0)] for v in VERDICTS]
    other = [[v, n] for v, n in sorted(counts.items(), key=lambda kv: str(kv[0])) if v not in VERDICTS]
    lines += _table(["verdict", "claims"], known + other + [["**total**", sum(counts.values())]])
    lines += ["", "## Claims", ""]
    if rows:
        lines += _table(["#", "claim", "the article", "measured here", "verdict", "notebook", "note"], rows)
    else:
        lines.append("No claims recorded yet.")
    return lines


def _points_section(results_dir: Path, report_dir: Path, include_smoke: bool, figure: bool) -> list[str]:
    from qlib.analysis.pareto import gather_points, group_by_metric, pareto_front

    points, _ = gather_points(results_dir, include_smoke=include_smoke)  # older runs: points from their own tables
    fig_path = results_dir / f"{FIGURE_NAME}.png"
    lines = ["## Pareto frontiers: speed vs quality", ""]
    if not points:
        if figure:
            fig_path.unlink(missing_ok=True)  # a stale figure would contradict the report
        return lines + ["No notebook has recorded points yet (`metrics[\"points\"]`, see `qlib.analysis.pareto`)."]
    if figure:
        import matplotlib.pyplot as plt

        from qlib.analysis.pareto import plot_frontiers
        from qlib.lab.results import save_figure

        fig = plot_frontiers(points, groups=group_by_metric(points))
        save_figure(fig, results_dir, FIGURE_NAME)
        plt.close(fig)
        lines += [f"![Pareto frontiers]({_rel(fig_path, report_dir)})", ""]
    lines.append("Speedup is against fp32 in the same run; quality only compares within one model and metric. "
                 "A point is on the frontier when no other variant of its model is both faster and better.")
    lines.append("")
    rows = []
    groups = group_by_metric(points)  # quality compares only within one model and one metric
    for key in sorted(groups):
        group = groups[key]
        front = {id(p) for p in pareto_front(group)}
        for p in group:
            metric = p.quality_name[1:] if p.quality_name.startswith("-") else p.quality_name
            rows.append([p.model, p.method, f"{p.bits:g}", metric, f"{p.raw_quality:.4g}", f"{p.speedup:.2f}×",
                         "" if p.bytes is None else f"{p.bytes / 1e6:,.1f} MB", p.source, "yes" if id(p) in front else ""])
    return lines + _table(["model", "method", "bits", "metric", "value", "speedup", "size", "notebook", "frontier"], rows)


def _runs_section(runs: list[dict], statuses: dict[str, str]) -> list[str]:
    rows = []
    by_stem = {r["notebook"]: r for r in runs}
    for stem in sorted(set(by_stem) | set(statuses)):
        run = by_stem.get(stem)
        if run is None:
            rows.append([stem, statuses[stem], "", "", "", "", ""])
            continue
        prov = run.get("provenance", {})
        sha = (prov.get("git_sha") or "?")[:10] + ("-dirty" if prov.get("git_dirty") else "")
        cpu = prov.get("cpu", {}).get("model_name", "?") if isinstance(prov.get("cpu"), dict) else prov.get("cpu", "?")
        rows.append([stem, "smoke run" if _is_smoke(run) else "full run", sha, prov.get("timestamp_utc", "?"), cpu,
                     prov.get("threads", "?"), _wall(prov.get("wall_s"))])
    return ["## Runs and provenance", ""] + _table(["notebook", "status", "git sha", "date (UTC)", "CPU", "threads", "wall time"], rows)


def build_report(results_dir: str | Path = RESULTS_DIR, notebook_dir: str | Path = NOTEBOOK_DIR,
                 report_dir: str | Path | None = None, include_smoke: bool = False, figure: bool = True) -> str:
    """The report's markdown (saves the Pareto figure into ``results_dir`` when ``figure``)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist; run the notebooks first "
                                f"(python -m qlib run) or point --results at the folder that holds <notebook>/metrics.json.")
    report_dir = Path(report_dir or results_dir)
    all_runs, problems = load_runs(results_dir)
    smoke = [r["notebook"] for r in all_runs if _is_smoke(r)]
    runs = all_runs if include_smoke else [r for r in all_runs if not _is_smoke(r)]
    statuses = dict(problems)
    for path in sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb")):
        statuses.setdefault(path.stem, "not run yet")
    for r in all_runs:
        if _is_smoke(r) and not include_smoke:
            statuses[r["notebook"]] = "not run yet (smoke run only, skipped)"
    for partial in sorted(results_dir.glob("*/metrics.partial.json")):
        if partial.parent.name not in {r["_dir"].name for r in runs}:
            statuses[partial.parent.name] = "interrupted (metrics.partial.json only)"
    for r in runs:
        statuses.pop(r["notebook"], None)

    lines = ["# Claims vs measured", "",
             "Generated by `python -m qlib report` from `results/*/metrics.json`; do not edit by hand.", ""]
    if include_smoke:
        lines.append(f"Smoke runs are included and marked: {', '.join(smoke) or 'none'}.")
    else:
        lines.append(f"Full runs only; smoke runs skipped: {', '.join(smoke) if smoke else 'none'}.")
    lines.append(f"Full runs: {sum(not _is_smoke(r) for r in runs)}; notebooks without results: "
                 f"{', '.join(sorted(statuses)) or 'none'}.")
    lines += [""] + _claims_section(runs, report_dir)
    lines += [""] + _points_section(results_dir, report_dir, include_smoke, figure)
    lines += [""] + _runs_section(runs, statuses)
    return "\n".join(lines) + "\n"


def write_report(results_dir: str | Path = RESULTS_DIR, out: str | Path | None = None,
                 notebook_dir: str | Path = NOTEBOOK_DIR, include_smoke: bool = False, figure: bool = True) -> Path:
    """Write the report atomically (default ``<results_dir>/REPORT.md``) and return its path."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir / "REPORT.md"
    text = build_report(results_dir, notebook_dir, report_dir=out.parent, include_smoke=include_smoke, figure=figure)
    return atomic_write_text(out, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlib report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <notebook>/metrics.json (default: results/)")
    ap.add_argument("--out", type=Path, default=None, help="report path (default: <results>/REPORT.md)")
    ap.add_argument("--notebooks", type=Path, default=NOTEBOOK_DIR, help="source notebooks, to list those not run yet")
    ap.add_argument("--include-smoke", action="store_true", help="include smoke runs, marked as such")
    ap.add_argument("--no-figure", action="store_true", help="do not draw results/pareto.png")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.results, args.out, args.notebooks, args.include_smoke, figure=not args.no_figure)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
