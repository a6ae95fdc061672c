"""Every Python example of README.md runs as shown, and every pipeline the DSL section builds
runs through the reference on a cache of the head layout its examples use (8 KV heads × 128).

The blocks are read from README.md itself (so an edit there is tested), each written to a file
and run as a script: an error points at the README block's own line.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

import twilight as tw
from twilight.runtime.serving.pipeline_cache import make_cache

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> list[tuple[str, int, str]]:
    """``(section, first line, code)`` of each ```python block."""
    out, section = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        if lines[i].strip() == "```python":
            j = lines.index("```", i + 1)
            out.append((section, i + 2, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out


BLOCKS = _blocks()


def test_the_readme_has_dsl_examples() -> None:
    sections = [s for s, _, _ in BLOCKS]
    assert sections.count("A pipeline in the DSL") >= 3 and "Running it" in sections


@pytest.mark.parametrize("section,line,code", BLOCKS, ids=[f"line{b[1]}" for b in BLOCKS])
def test_readme_example_runs(section, line, code, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TWILIGHT_CACHE_DIR", str(tmp_path / "cache"))
    script = tmp_path / f"readme_line{line}.py"
    script.write_text("\n" * (line - 1) + code)  # line numbers as in README.md
    ns = runpy.run_path(str(script))
    pipes = {n: v for n, v in ns.items() if isinstance(v, tw.Pipeline)}
    if section == "A pipeline in the DSL":
        assert pipes, "a DSL example builds a pipeline"
    for name, pipe in pipes.items():
        _runs(name, pipe)


def _runs(name: str, pipe: tw.Pipeline) -> None:
    """The pipeline on a small cache of the README's head layout: a well-formed output and
    a kept set within what its rules allow."""
    gen = torch.Generator().manual_seed(0)
    cache = make_cache(pipe, 8, 128, dtype=torch.float32)
    ids = cache.add_requests(2)
    for rid, n in zip(ids, (300, 77), strict=True):
        cache.append(torch.randn(8, n, 128, generator=gen), torch.randn(8, n, 128, generator=gen),
                     rid)
    q = torch.randn(2, 32, 128, generator=gen)
    out, kept = tw.reference(pipe).run(q, cache, return_kept=True)
    assert out.shape == q.shape and torch.isfinite(out).all(), name
    assert (kept.count >= 1).all() and (kept.count <= kept.lengths[:, None]).all(), name
