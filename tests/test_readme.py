"""The README's Python examples run as written: each block in a fresh namespace.

A block that shows a result asserts it (or prints it beside a comment a reader can check);
an exception anywhere fails the test, so the README cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 8, f"found {len(BLOCKS)} python blocks in {README}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_example_runs(index):
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": f"readme_block_{index}"})
