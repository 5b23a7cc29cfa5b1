"""The notebooks' code cells name no module path of one architecture: they ask qlib.methods.arch's table instead."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# Each pattern is a module path (or a hand-made block cut) of one family; qlib.methods.arch's helpers replace it:
# block_linear_names / block_filter (selection), block_position (block index of a name), trim_blocks, head_linear_names.
HARD_CODED = {
    r"\bmodel\.layers\b": "a Llama-family block list",
    r"\bencoder\.layer\b": "a BERT block list",
    r"\btransformer\.h\b": "a GPT-2 block list",
    r"\.layers\s*(\[|=)": "a block list cut or reassigned by hand",
    r"\bbert\.(pooler|encoder|embeddings)\b": "a BERT submodule",
    r"\b(self_attn|mlp|attn|attention|intermediate)\.\w": "a projection addressed by its path inside a block",
    r"\.(q|k|v|o|gate|up|down)_proj\b|[\"'](q|k|v|o|gate|up|down)_proj[\"']": "a Llama projection name in a path",
    r"\bc_(attn|proj|fc)\b": "a GPT-2 projection name",
    r"\.split\(\s*[\"']\.[\"']\s*(,\s*\d+\s*)?\)\s*\[\d": "a block index or role parsed out of a module name",
}


def _code_lines(nb: Path) -> list[tuple[int, str]]:
    """(cell index, line) of every line of the notebook's code cells."""
    cells = json.loads(nb.read_text())["cells"]
    return [(i, line) for i, c in enumerate(cells) if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]


def test_the_scan_finds_every_notebook_and_catches_each_pattern():
    assert len(NOTEBOOKS) >= 13
    examples = ['m.model.layers = m.model.layers[:2]', 'fqn.startswith("bert.encoder.layer.")', 'h = lm.transformer.h',
                'blocks = lm.layers[:4]', 'clf.bert.pooler.dense', 'name.endswith("mlp.down_proj")',
                'if "q_proj" in fqn:', 'if n.endswith("c_attn"):', 'int(fqn.split(".")[2])']
    for text in examples:
        assert any(re.search(p, text) for p in HARD_CODED), text
    for text in ('run.log("down_proj_inputs", rows)', 'f"down_proj inputs reach {x}"', '[k.split(".")[-1] for k in kinds]'):
        assert not any(re.search(p, text) for p in HARD_CODED), text  # a metric key, prose, a short label: no path


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_has_no_hard_coded_module_paths(nb):
    found = [f"cell {i}: {line.strip()} ({why})" for i, line in _code_lines(nb)
             for p, why in HARD_CODED.items() if re.search(p, line)]
    assert not found, (f"{nb.name} spells module paths of one architecture; select layers with "
                       f"qlib.methods.arch (block_linear_names, block_filter, trim_blocks, ...):\n" + "\n".join(found))
