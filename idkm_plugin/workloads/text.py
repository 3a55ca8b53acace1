"""Offline English and Python text that every machine has: the standard library's sources and their docstring
sentences, and Debian's license texts as English from another domain (examples/minilm_distill.py,
examples/llm_qat.py, the MiniLM benchmarks).

Docstring sentences: the stdlib's .py files are parsed with `ast`, docstrings split into sentences, deduplicated and
filtered by length; `split` holds out the sentences with the smallest MD5 digests (a fixed split: it depends on the
sentence, not on file order).
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from typing import Iterable, Optional

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
LICENSE_DIR = "/usr/share/common-licenses"  # Debian's license texts: English far from docstrings


def stdlib_files(root: Optional[str] = None) -> list[str]:
    """The standard library's .py files (tests, IDLE, lib2to3 and site-packages excluded), in sorted order."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def docstrings(source: str) -> Iterable[str]:
    """The module, class and function docstrings of one Python source (nothing if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def sentences_of(doc: str, min_chars: int = 40, max_chars: int = 200) -> Iterable[str]:
    """English-looking sentences of a docstring: paragraphs joined into one line, split after . ! ? before a
    capital; kept if min_chars..max_chars long, capitalised, ending in . ! ?, mostly letters, no doctest."""
    for paragraph in re.split(r"\n\s*\n", doc):
        for s in SENTENCE_END.split(" ".join(paragraph.split())):
            if (min_chars <= len(s) <= max_chars and s[0].isupper() and s[-1] in ".!?" and ">>>" not in s
                    and sum(c.isalpha() for c in s) > 0.7 * len(s)):
                yield s


def stdlib_sentences(root: Optional[str] = None) -> list[str]:
    """Deduplicated docstring sentences of the standard library, sorted."""
    found: set[str] = set()
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for doc in docstrings(source):
            found.update(sentences_of(doc))
    return sorted(found)


def license_sentences(folder: str = LICENSE_DIR) -> list[str]:
    """Deduplicated, sorted sentences of the license texts in `folder` ([] when it does not exist): held-out text
    from another domain, to see what a calibration on docstrings does elsewhere."""
    found: set[str] = set()
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found.update(sentences_of(f.read()))
        except (OSError, UnicodeDecodeError):
            continue
    return sorted(found)


def split(sentences: list[str], n_test: int) -> tuple[list[str], list[str]]:
    """(train, held-out): the held-out set is the n_test sentences with the smallest MD5 digests."""
    ordered = sorted(sentences, key=lambda s: hashlib.md5(s.encode()).hexdigest())
    return ordered[n_test:], ordered[:n_test]
