"""Declarative verdicts: a claim's bars are data (``data/bars.yaml``), one function turns a measured value into a verdict.

A :class:`Bar` says what is measured and in which unit, which direction counts, and the level a value must reach
for ``reproduced`` and (optionally) for ``partly``. :func:`judge` compares a value with a bar and returns a
:class:`Judgement`: the verdict plus the text of the bar for the claim's note, so prose never repeats a threshold::

    >>> j = judge("01.dynamic_int8.speedup_b1", 2.31)
    >>> j.verdict, j.note
    ('reproduced', "speed-up of dynamic INT8 over FP32 at batch 1: 2.31×; bars: reproduced ≥ 1.785× (0.85 × the article's 2.1×), partly > 1.2×")

A level in the file is an operator and a number, optionally a multiple of the article's figure (``">= 0.85 ×
article"``) or of a measured reference passed at judge time (``"< 0.5 × reference"``); ``partly: otherwise`` means
every value that misses ``reproduced`` (NaN included) is ``partly``; no ``reproduced`` level means the evidence can
support at most ``partly``. A claim that needs several conditions combines judgements: :func:`all_of` (as strong as
its weakest part), :func:`any_of` (its strongest part), or a count of parts met judged against a bar (:func:`tally`).

An optional interval (e.g. a 95% bootstrap interval) can be passed to :func:`judge`: the verdict is the one both
bounds reach; where the interval straddles a bar the weaker bound's verdict is returned and the note says so
(the evidence work maps that case to its own verdict once ``qlib.lab.results.VERDICTS`` has one).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Iterable, Literal

from qlib.lab.paths import REPO_ROOT
from qlib.lab.results import Claim

BARS_FILE = REPO_ROOT / "data" / "bars.yaml"
ID_PATTERN = re.compile(r"^\d\d\.[a-z0-9_]+\.[a-z0-9_]+$")  # NN.topic.measure, e.g. 01.dynamic_int8.speedup_b1
LEVELS = ("reproduced", "partly", "not reproduced")  # strongest first; "not testable offline" is never judged
_LEVEL_RE = re.compile(r"^(>=|>|<=|<|≥|≤)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(?:[×x*]\s*(article|reference))?$")
_OPS = {">=": (True, False), ">": (True, True), "≥": (True, False), "<=": (False, False), "<": (False, True), "≤": (False, False)}


@dataclasses.dataclass(frozen=True)
class Level:
    """One bar: a value must be above (higher is better) or below it, strictly or not; ``scale`` multiplies it."""

    threshold: float
    strict: bool = False
    scale: Literal["article", "reference"] | None = None  # the threshold is a multiple of the article's figure / a reference
    otherwise: bool = False  # every value meets it (``partly: otherwise``)
    above: bool | None = None  # the operator's direction (> / >= above, < / <= below); None for a bare number

    @classmethod
    def parse(cls, spec: str | float | int) -> "Level":
        """``">= 0.85 × article"``, ``"< 25"``, ``"otherwise"`` or a bare number (``>=`` / ``<=`` by the bar's direction)."""
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(float(spec))
        text = str(spec).strip()
        if text == "otherwise":
            return cls(math.nan, otherwise=True)
        m = _LEVEL_RE.match(text)
        if not m:
            raise ValueError(f"bar level {spec!r} is not understood; write e.g. '>= 1.2', '< 0.5 × reference' or 'otherwise'.")
        above, strict = _OPS[m.group(1)]
        return cls(float(m.group(2)), strict, m.group(3), above=above)


@dataclasses.dataclass(frozen=True)
class Bar:
    """What is measured, the direction that counts, and the levels for ``reproduced`` and ``partly``."""

    id: str
    measure: str                         # what is measured, as the note names it
    better: Literal["higher", "lower"]   # the direction that supports the claim
    reproduced: Level | None             # None: this evidence supports at most "partly"
    why: str                             # one line: why this bar
    unit: str = ""                       # "×", "%", "pt", "s", ... ("" for counts and fractions)
    partly: Level | None = None          # None: no partly level (misses are "not reproduced")
    article: float | None = None         # the article's figure, for levels written "× article"
    reference: str | None = None         # what a "× reference" level multiplies (passed to judge as reference=)
    around: float | None = None          # measure |value − around| instead of the value

    def __post_init__(self) -> None:
        where = f"bar {self.id!r}"
        if not ID_PATTERN.match(self.id):
            raise ValueError(f"{where}: ids read 'NN.topic.measure' (lower case, digits, underscores); rename it.")
        if self.better not in ("higher", "lower"):
            raise ValueError(f"{where}: better must be 'higher' or 'lower', not {self.better!r}.")
        if not self.measure.strip() or not self.why.strip():
            raise ValueError(f"{where}: say what is measured (measure) and why this bar (why).")
        if self.reproduced is None and self.partly is None:
            raise ValueError(f"{where}: give a level for reproduced, partly or both.")
        for name, level in (("reproduced", self.reproduced), ("partly", self.partly)):
            if level is None:
                continue
            if level.above is not None and level.above != (self.better == "higher"):
                raise ValueError(f"{where}: {name}'s operator points the other way from better: {self.better}; fix one.")
            if level.otherwise and name == "reproduced":
                raise ValueError(f"{where}: 'otherwise' is only for partly; give reproduced a number.")
            if level.scale == "article" and self.article is None:
                raise ValueError(f"{where}: {name} is a multiple of the article's figure; add article: <number>.")
            if level.scale == "reference" and not self.reference:
                raise ValueError(f"{where}: {name} is a multiple of a reference; say which in reference: <text>.")
        r, p = self.reproduced, self.partly
        if r is not None and p is not None and not p.otherwise and (r.scale == "reference") == (p.scale == "reference"):
            rt, pt = self.threshold(r, 1.0), self.threshold(p, 1.0)  # reference levels compare as multiples
            sign = 1 if self.better == "higher" else -1
            if sign * (rt - pt) < 0 or (rt == pt and (p.strict or not r.strict)):
                raise ValueError(f"{where}: reproduced ({rt:g}) must be stricter than partly ({pt:g}) for "
                                 f"{self.better}-is-better; swap or fix the levels.")

    def threshold(self, level: Level, reference: float | None) -> float:
        """The level's threshold in the measure's unit (a scaled level times the article's figure or the reference)."""
        if level.scale == "article":
            return level.threshold * self.article
        if level.scale == "reference":
            if reference is None:
                raise ValueError(f"bar {self.id!r} is relative to {self.reference}; pass judge(..., reference=<value>).")
            return level.threshold * reference
        return level.threshold

    def meets(self, level: Level, value: float, reference: float | None = None) -> bool:
        """Whether ``value`` clears ``level`` in the bar's direction (NaN clears nothing but ``otherwise``)."""
        if level.otherwise:
            return True
        t = self.threshold(level, reference)
        if self.better == "higher":
            return value > t if level.strict else value >= t
        return value < t if level.strict else value <= t

    def verdict(self, value: float, reference: float | None = None) -> str:
        """The strongest verdict whose level ``value`` clears."""
        if self.reproduced is not None and self.meets(self.reproduced, value, reference):
            return "reproduced"
        if self.partly is not None and self.meets(self.partly, value, reference):
            return "partly"
        return "not reproduced"

    def describe(self, reference: float | None = None) -> str:
        """The levels as text, e.g. "reproduced ≥ 1.785× (0.85 × the article's 2.1×), partly > 1.2×"."""
        parts = [self._level_text(name, level, reference) for name, level in
                 (("reproduced", self.reproduced), ("partly", self.partly)) if level is not None]
        return ", ".join(parts + ([] if self.reproduced is not None else ["at most partly"]))

    def _level_text(self, name: str, level: Level, reference: float | None) -> str:
        """One level as text: operator, threshold with unit, and where a scaled threshold comes from."""
        if level.otherwise:
            return f"{name} otherwise"
        op = (">" if level.strict else "≥") if self.better == "higher" else ("<" if level.strict else "≤")
        u, k = self.unit_text, _num(level.threshold)
        if level.scale == "article":
            return f"{name} {op} {_num(level.threshold * self.article)}{u} ({k} × the article's {_num(self.article)}{u})"
        if level.scale == "reference" and reference is None:
            return f"{name} {op} {k} × {self.reference}"
        if level.scale == "reference" and level.threshold == 1:
            return f"{name} {op} {self.reference} ({_num(reference)}{u})"
        if level.scale == "reference":
            return f"{name} {op} {_num(level.threshold * reference)}{u} ({k} × {self.reference}, {_num(reference)}{u})"
        return f"{name} {op} {k}{u}"

    @property
    def unit_text(self) -> str:
        """The unit as written after a number ("2.1×", "3%", "0.5 pt")."""
        return self.unit if self.unit in ("", "×", "%") else f" {self.unit}"

    @property
    def measure_text(self) -> str:
        """The measure's name, as |x − around| when the bar measures a distance."""
        if self.around is None:
            return self.measure
        return f"|{self.measure}|" if self.around == 0 else f"|{self.measure} − {_num(self.around)}|"


def _num(x: float) -> str:
    """A number for a note: integers plain, others with 4 significant digits."""
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, int) or (isinstance(x, float) and math.isfinite(x) and x == int(x) and abs(x) < 1e6):
        return str(int(x))
    return f"{x:.4g}"


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A verdict and the note that explains it (the measured value against the bar, or the parts it combines)."""

    verdict: str
    note: str

    @property
    def reproduced(self) -> bool:
        """Whether the judgement reached ``reproduced`` (a condition of a combined claim is met)."""
        return self.verdict == "reproduced"

    @property
    def holds(self) -> bool:
        """Whether the judgement reached any level of its bar (reproduced or partly)."""
        return self.verdict in LEVELS[:2]


def _load(path: Path) -> dict[str, Bar]:
    """Read and validate every bar in ``path``."""
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    bars = {}
    for bar_id, spec in raw.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: bar {bar_id!r} must be a mapping of fields (measure, better, reproduced, ...).")
        spec = dict(spec)
        unknown = set(spec) - {f.name for f in dataclasses.fields(Bar)} - {"id"}
        if unknown:
            raise ValueError(f"{path}: bar {bar_id!r} has unknown fields {sorted(unknown)}; see qlib.lab.verdicts.Bar.")
        for name in ("reproduced", "partly"):
            if spec.get(name) is not None:
                spec[name] = Level.parse(spec[name])
        for name in ("article", "around"):
            if spec.get(name) is not None:
                spec[name] = float(spec[name])
        spec.setdefault("reproduced", None)
        bars[str(bar_id)] = Bar(id=str(bar_id), **spec)
    return bars


@functools.lru_cache(maxsize=4)
def load_bars(path: Path | str = BARS_FILE) -> dict[str, Bar]:
    """All bars of ``data/bars.yaml`` by id, validated (cached)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; the bars file ships with the repo (data/bars.yaml).")
    return _load(path)


def bar(bar_id: str) -> Bar:
    """One bar by id."""
    bars = load_bars()
    if bar_id not in bars:
        raise KeyError(f"no bar {bar_id!r} in {BARS_FILE.name}; add it there (ids of this notebook: "
                       f"{[b for b in bars if b[:3] == bar_id[:3]]}).")
    return bars[bar_id]


def judge(which: str | Bar, value: float, *, reference: float | None = None,
          interval: tuple[float, float] | None = None) -> Judgement:
    """The verdict of ``value`` against a bar (an id of data/bars.yaml or a :class:`Bar`), with the bar as text.

    ``reference`` is the measured value that "× reference" levels multiply. With ``interval`` (low, high) the
    verdict is the one both bounds reach; an interval that straddles a bar gets the weaker bound's verdict.
    """
    b = bar(which) if isinstance(which, str) else which
    value = float(value)
    measured = value if b.around is None else abs(value - b.around)
    verdict = b.verdict(measured, reference)
    shown = f"{_num(measured)}{b.unit_text}"
    if interval is not None:
        lo, hi = (float(x) for x in interval)
        if not lo <= value <= hi:
            raise ValueError(f"interval ({lo:g}, {hi:g}) does not contain the value {value:g}; pass (low, high) around it.")
        if b.around is not None:  # the interval of the distance |x − around|
            lo, hi = (0.0 if lo <= b.around <= hi else min(abs(lo - b.around), abs(hi - b.around)),
                      max(abs(lo - b.around), abs(hi - b.around)))
        ends = {b.verdict(lo, reference), b.verdict(hi, reference)}
        verdict = max(ends, key=LEVELS.index)  # the weaker end: a bar counts as cleared only when the whole interval does
        shown += f" [{_num(lo)}, {_num(hi)}]" + (", the interval straddles a bar" if len(ends) > 1 else "")
    return Judgement(verdict, f"{b.measure_text}: {shown}; bars: {b.describe(reference)}")


def all_of(*parts: Judgement) -> Judgement:
    """A claim that needs every part: as strong as its weakest part."""
    verdict = max((p.verdict for p in parts), key=LEVELS.index)
    return Judgement(verdict, "all of — " + " | ".join(f"{p.note} ({p.verdict})" for p in parts))


def any_of(*parts: Judgement) -> Judgement:
    """A claim that any part supports: as strong as its strongest part."""
    verdict = min((p.verdict for p in parts), key=LEVELS.index)
    return Judgement(verdict, "any of — " + " | ".join(f"{p.note} ({p.verdict})" for p in parts))


def tally(which: str | Bar, parts: Iterable[Judgement]) -> Judgement:
    """Count the parts that hold (reach any level of their bar) and judge the count against a bar."""
    parts = list(parts)
    j = judge(which, sum(p.holds for p in parts))
    return Judgement(j.verdict, f"{j.note} — " + " | ".join(f"{p.note} ({'met' if p.holds else 'missed'})" for p in parts))


def claim(claim: str, article: str, measured: str, verdict: Judgement | str, note: str = "") -> Claim:
    """A :class:`Claim` whose verdict comes from a judgement (its bar text leads the note) or is given as a word."""
    if isinstance(verdict, Judgement):
        return Claim(claim, article, measured, verdict.verdict, f"{verdict.note}. {note[:1].upper()}{note[1:]}" if note else verdict.note)
    return Claim(claim, article, measured, verdict, note)


def bars_note(*bar_ids: str, reference: float | None = None) -> str:
    """The named bars as text, for prose that states a bar without judging a value."""
    return "; ".join(f"{bar(i).measure_text}: {bar(i).describe(reference)}" for i in bar_ids)


def bar_ids_in(text: str) -> set[str]:
    """Bar ids quoted in a piece of code (what a notebook uses)."""
    return {m for m in re.findall(r"""["'](\d\d\.[a-z0-9_]+\.[a-z0-9_]+)["']""", text)}


def _cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, line breaks as <br>."""
    return str(text).replace("|", "\\|").replace("\n", "<br>").strip()


def claims_markdown(claims: Iterable[Claim | dict]) -> str:
    """A notebook's claims as one untruncated Markdown table: claim, the article, measured, verdict, bar and note."""
    rows = ["| claim | the article | measured | verdict | bar and note |", "|---|---|---|---|---|"]
    for c in claims:
        d = c if isinstance(c, dict) else dataclasses.asdict(c)
        rows.append("| " + " | ".join(_cell(d.get(k, "")) for k in ("claim", "article", "measured")) +
                    f" | **{_cell(d['verdict'])}** | {_cell(d.get('note', ''))} |")
    return "\n".join(rows) + "\n"


def show_claims(claims: Iterable[Claim | dict]):
    """The claims table for a notebook cell's output (an IPython Markdown object; plain text outside IPython)."""
    text = claims_markdown(claims)
    try:
        from IPython.display import Markdown
    except ImportError:
        return text
    return Markdown(text)
