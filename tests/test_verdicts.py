"""Declarative verdicts: every bar in data/bars.yaml is valid and used, and judge() compares exactly as documented."""
import json
import math

import pytest

from qlib.lab.paths import REPO_ROOT
from qlib.lab.results import VERDICTS
from qlib.lab.verdicts import (Bar, Judgement, Level, all_of, any_of, bar_ids_in, claim, judge, load_bars,
                               tally)

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def make(better="higher", reproduced=">= 2", partly="> 1", **kw) -> Bar:
    """A bar for the tests (levels written as in data/bars.yaml)."""
    return Bar(id="99.test.value", measure="speed-up", better=better, why="a test",
               reproduced=None if reproduced is None else Level.parse(reproduced),
               partly=None if partly is None else Level.parse(partly), **kw)


def notebook_code(path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")


def test_every_bar_in_the_file_validates_and_orders_its_levels():
    bars = load_bars()
    assert len(bars) >= 40
    for b in bars.values():
        assert b.id.split(".")[0] in {p.name[:2] for p in NOTEBOOKS}
        if b.reproduced is not None and b.partly is not None and not b.partly.otherwise and b.reproduced.scale != "reference":
            r, p = b.threshold(b.reproduced, None), b.threshold(b.partly, None)
            assert (r >= p) if b.better == "higher" else (r <= p), b.id  # reproduced is the stricter bar


def test_every_bar_a_notebook_uses_exists_and_every_bar_is_used():
    used = {nb.name[:2]: bar_ids_in(notebook_code(nb)) for nb in NOTEBOOKS}
    bars = set(load_bars())
    for nn, ids in used.items():
        assert ids <= bars, f"notebook {nn} uses bars missing from data/bars.yaml: {sorted(ids - bars)}"
        assert all(i.startswith(nn + ".") for i in ids), f"notebook {nn} uses another notebook's bar"
    assert bars <= set().union(*used.values()), f"bars no notebook uses: {sorted(bars - set().union(*used.values()))}"


def test_no_inline_verdict_expressions_in_notebooks():
    for nb in NOTEBOOKS:
        code = notebook_code(nb)
        for word in ("reproduced", "partly", "not reproduced"):
            assert f'"{word}" if' not in code, f"{nb.name}: an inline verdict; judge the value against a bar instead"


def test_a_value_exactly_at_the_bar_passes_only_when_not_strict():
    assert judge(make(reproduced=">= 2"), 2.0).verdict == "reproduced"
    assert judge(make(reproduced="> 2"), 2.0).verdict == "partly"
    assert judge(make(partly="> 1"), 1.0).verdict == "not reproduced"
    assert judge(make(partly=">= 1"), 1.0).verdict == "partly"


def test_lower_is_better_and_distances():
    b = make(better="lower", reproduced="<= 0.5", partly="<= 1.0", around=0.0)
    assert [judge(b, v).verdict for v in (-0.5, 0.7, -1.0, 1.01)] == ["reproduced", "partly", "partly", "not reproduced"]
    assert judge(make(better="lower", reproduced="<= -1", partly=None), -1.0).verdict == "reproduced"
    assert judge(make(better="lower", reproduced="<= -1", partly=None), -0.99).verdict == "not reproduced"


def test_scaled_levels_multiply_the_article_or_a_reference():
    b = make(reproduced=">= 0.85 × article", partly="> 1.2", article=2.1)
    assert judge(b, 0.85 * 2.1).verdict == "reproduced"
    assert judge(b, math.nextafter(0.85 * 2.1, 0)).verdict == "partly"
    r = make(better="lower", reproduced="< 0.5 × reference", partly="< 1 × reference", reference="GPTQ's penalty")
    assert [judge(r, v, reference=4.0).verdict for v in (1.9, 2.0, 3.9, 4.0)] == ["reproduced", "partly", "partly",
                                                                                  "not reproduced"]
    with pytest.raises(ValueError, match="reference="):
        judge(r, 1.0)


def test_otherwise_takes_nan_and_at_most_partly_never_reproduces():
    assert judge(make(partly="otherwise"), math.nan).verdict == "partly"
    assert judge(make(), math.nan).verdict == "not reproduced"
    assert judge(make(reproduced=None, partly="> 0"), 1e9).verdict == "partly"


def test_the_note_states_value_bars_and_where_a_bar_comes_from():
    b = make(reproduced=">= 0.85 × article", partly="> 1.2", article=2.1, unit="×")
    note = judge(b, 2.31).note
    assert note == "speed-up: 2.31×; bars: reproduced ≥ 1.785× (0.85 × the article's 2.1×), partly > 1.2×"
    assert "at most partly" in judge(make(reproduced=None, partly="> 0"), 1).note
    assert "|speed-up − 0.512|: 0.038" in judge(make(better="lower", reproduced="<= 0.05", partly=None, around=0.512), 0.55).note


def test_an_interval_must_clear_a_bar_entirely():
    b = make(reproduced=">= 2", partly="> 1")
    assert judge(b, 2.5, interval=(2.1, 2.9)).verdict == "reproduced"
    straddling = judge(b, 2.5, interval=(1.8, 2.9))
    assert straddling.verdict == "partly" and "straddles" in straddling.note
    with pytest.raises(ValueError, match="does not contain"):
        judge(b, 2.5, interval=(2.6, 2.9))
    assert "inconclusive" not in VERDICTS  # the fifth verdict arrives with the evidence work


def test_combinations_take_the_weakest_strongest_or_count_parts():
    r, p, n = (Judgement(v, v) for v in ("reproduced", "partly", "not reproduced"))
    assert all_of(r, p).verdict == "partly" and all_of(r, n).verdict == "not reproduced"
    assert any_of(n, p).verdict == "partly" and any_of(n, r).verdict == "reproduced"
    count = make(reproduced=">= 2", partly=">= 1")
    assert [tally(count, parts).verdict for parts in ([r, r], [r, n], [p, n], [n, n])] == [
        "reproduced", "partly", "partly", "not reproduced"]


def test_bars_refuse_levels_in_the_wrong_order_or_without_their_basis():
    with pytest.raises(ValueError, match="stricter"):
        make(reproduced=">= 1", partly="> 2")
    with pytest.raises(ValueError, match="stricter"):
        make(reproduced=">= 1", partly=">= 1")
    with pytest.raises(ValueError, match="other way"):
        make(better="lower", reproduced=">= 1", partly=None)
    with pytest.raises(ValueError, match="article"):
        make(reproduced=">= 0.85 × article")
    with pytest.raises(ValueError, match="not understood"):
        Level.parse("about 2")
    with pytest.raises(ValueError, match="NN.topic.measure"):
        Bar(id="speedup", measure="x", better="higher", why="y", reproduced=Level(1.0))


def test_claim_takes_a_judgement_or_an_explicit_word():
    c = claim("c", "a", "m", judge(make(), 3.0), "context")
    assert c.verdict == "reproduced" and c.note.endswith(". Context") and "bars:" in c.note
    assert claim("c", "a", "m", "not testable offline").verdict == "not testable offline"


def test_claims_table_is_untruncated_markdown_with_escaped_cells():
    from qlib.lab.results import Claim
    from qlib.lab.verdicts import claims_markdown, show_claims

    long = "a measured value " * 20
    claims = [Claim("X | Y holds", "the article: 2×", long, "partly", "bar: > 1.5×\nsecond line"),
              {"claim": "Z", "article": "—", "measured": "3", "verdict": "reproduced", "note": ""}]
    text = claims_markdown(claims)
    lines = text.splitlines()
    assert lines[0] == "| claim | the article | measured | verdict | bar and note |" and len(lines) == 4
    assert long.strip() in text and "X \\| Y holds" in text and "bar: > 1.5×<br>second line" in text
    assert "**partly**" in lines[2] and "**reproduced**" in lines[3]
    assert all(ln.count(" | ") == 4 for ln in lines[2:])  # five cells a row: the escaped pipe splits none
    assert show_claims(claims).data == text
