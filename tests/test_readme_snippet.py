"""Run the "use it in your torchrec model" snippet verbatim, so it can never rot.

The snippet is the ```python block between ``<!-- snippet:start -->`` and
``<!-- snippet:end -->`` in README.md.
"""

from pathlib import Path
from typing import Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- snippet:start -->", "<!-- snippet:end -->"
SOURCES = (ROOT / "README.md",)


def extract_snippet(text: str) -> str:
    """The first ```python fenced block between the markers."""
    if START not in text or END not in text:
        raise ValueError(f"markers {START} ... {END} not found")
    region = text.split(START, 1)[1].split(END, 1)[0]
    if "```python" not in region:
        raise ValueError("no ```python block between the snippet markers")
    return region.split("```python", 1)[1].split("```", 1)[0]


def snippet_source() -> Tuple[Path, str]:
    """The snippet of README.md."""
    for path in SOURCES:
        if path.exists() and START in path.read_text():
            return path, extract_snippet(path.read_text())
    raise FileNotFoundError(f"no snippet markers in {[str(p) for p in SOURCES]}")


def test_extract_snippet_reads_only_the_marked_block():
    text = f"intro\n```python\nbad = 1\n```\n{START}\ntext\n```python\ngood = 2\n```\n{END}\n"
    assert extract_snippet(text).strip() == "good = 2"
    with pytest.raises(ValueError, match="markers"):
        extract_snippet("```python\nx = 1\n```")


def test_snippet_runs_verbatim():
    path, code = snippet_source()
    namespace = {"__name__": "__snippet__"}
    torch.manual_seed(0)
    exec(compile(code, str(path), "exec"), namespace)
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
