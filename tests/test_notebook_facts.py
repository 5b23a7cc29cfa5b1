"""Claims, titles and findings of the LM notebooks name the model that ran: no string in their code spells the default's facts."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from qlib.lab.models import DISPLAY_NAMES, LM_KEYS

ROOT = Path(__file__).resolve().parents[1] / "notebooks"
LM_NOTEBOOKS = [next(ROOT.glob(f"{n}_*.ipynb")) for n in ("00", "01", "02", "03", "04", "05", "09", "10", "12")]

# Facts of the default model (SmolLM2-135M) that a string would only contain if it were typed in;
# qlib.lab.models.model_facts gives them for whichever model ran.
DEFAULT_FACTS = {
    r"smollm": "the default model's name (use facts.name / facts.short_name)",
    r"\b135M\b|\b134\.5M\b": "its parameter count (facts.params_label)",
    r"\b28M\b|\b21%": "its embedding size or share (facts.embedding_label, facts.embedding_share)",
    r"\b576\b": "its hidden width (facts.hidden_size)",
    r"\b30 (decoder )?(blocks|layers)\b": "its number of blocks (facts.n_blocks)",
    r"\b49,?152\b": "its vocabulary size (facts.vocab_size)",
}


def _strings(source: str) -> list[str]:
    """Every string literal of a code cell, f-string parts included; zoo keys (which model to load) are left out."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    return [n.value for n in ast.walk(ast.parse(code))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value not in LM_KEYS]


def _found(source: str) -> list[str]:
    return [f"{s!r} ({why})" for s in _strings(source) for p, why in DEFAULT_FACTS.items() if re.search(p, s, re.I)]


def test_the_scan_catches_typed_in_facts_and_spares_computed_ones():
    typed = ['claim("x", "y", f"SmolLM2-135M W4: {a:.1f}")', 't = "a 135M model is 21% embedding"',
             'ax.set_title("576-wide inputs")', 's = f"every linear of the 30 decoder blocks {n}"', 'v = "49152 tokens"']
    for src in typed:
        assert _found(src), src
    computed = ['LM = "smollm2-135m"', 'claim("x", "y", f"{facts.name} W4: {a:.1f}")',
                't = f"a {facts.params_label} model is {facts.embedding_share:.0%} embedding"']
    for src in computed:
        assert not _found(src), src
    assert DISPLAY_NAMES["smollm2-135m"] == "SmolLM2-135M"  # the name the committed results were written with


@pytest.mark.parametrize("nb", LM_NOTEBOOKS, ids=lambda p: p.stem)
def test_lm_notebook_strings_name_no_default_model_fact(nb):
    cells = json.loads(nb.read_text())["cells"]
    found = [f"cell {i}: {hit}" for i, c in enumerate(cells) if c["cell_type"] == "code" for hit in _found("".join(c["source"]))]
    assert not found, (f"{nb.name} types the default model's facts into strings; build them from "
                       "qlib.lab.models.model_facts(lm, LM):\n" + "\n".join(found))
