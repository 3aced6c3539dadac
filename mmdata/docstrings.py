"""A real English text corpus built offline: the docstrings of the Python sources
installed beside mmtok (the standard library and the pinned packages).

It exists so quantizers can be measured on tens of thousands of real texts without a
download: the first paragraph of every module, class and function docstring, cleaned,
de-duplicated and sampled with a seed. With the same lock file, the same corpus.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm


def _first_paragraph(doc: str) -> str:
    text = doc.strip().split("\n\n")[0]
    return " ".join(text.split())


def _source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])}
    return sorted(r for r in roots if r.exists())


def load_docstring_corpus(n: int = 50_000, *, seed: int = 0, min_chars: int = 40,
                          max_chars: int = 400, progress: bool = True) -> pl.DataFrame:
    """Returns an items frame (item_id, text, source) of up to ``n`` distinct docstrings."""
    seen: set[str] = set()
    texts, sources = [], []
    files = sorted(p for root in _source_roots() for p in root.rglob("*.py")
                   if "test" not in p.parts[-1] and "__pycache__" not in p.parts)
    for path in tqdm(files, desc="scan docstrings", unit="file", disable=not progress):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            text = _first_paragraph(doc)
            if not (min_chars <= len(text) <= max_chars) or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            sources.append(path.parent.name)
    if not texts:
        raise RuntimeError(f"no docstrings found under {_source_roots()}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(texts), size=min(n, len(texts)), replace=False))
    return pl.DataFrame({
        "item_id": np.arange(len(keep), dtype=np.int64),
        "text": [texts[i] for i in keep],
        "source": [sources[i] for i in keep],
    })


if __name__ == "__main__":  # a quick look: python -m mmdata.docstrings
    corpus = load_docstring_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    print(corpus)
