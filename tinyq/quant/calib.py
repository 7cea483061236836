"""Calibration and evaluation text, read at run time (nothing is copied into tinyq).

Sources:

* ``--calib-file``: files or directories the user names (``.txt``, ``.md``, ``.rst`` read as text,
  ``.html``/``.htm`` stripped of markup).
* The Debian Administrator's Handbook (``apt-get install debian-handbook``; English HTML in
  ``/usr/share/doc/debian-handbook/html/en-US``, override with ``TINYQ_HANDBOOK_DIR``), split by chapter
  so calibration never sees evaluation text: **evaluation = chapters 1-8** (the-debian-project ..
  basic-configuration), **calibration = everything else** (preface, foreword, chapters 9-16, appendices).
  Listings (``<pre>``) and navigation are dropped; the rest is the book's prose.
* Python's standard-library docstrings (always installed): the fallback calibration source when the
  handbook is absent, so a fresh machine can quantize offline.

``default_calibration_text()`` picks the handbook's calibration split if it is installed, else the
docstrings, and says which it used.
"""
from __future__ import annotations

import ast
import html
import os
import re
import sysconfig
from pathlib import Path

import torch

HANDBOOK_DIR = "/usr/share/doc/debian-handbook/html/en-US"
# Chapter pages in book order; each "sect.*" page belongs to the chapter page before it in the TOC.
EVAL_CHAPTERS = (
    "the-debian-project", "case-study", "existing-setup", "installation",
    "packaging-system", "apt", "solving-problems", "basic-configuration",
)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")

_DROP = re.compile(
    r"(?is)<head.*?</head>|<script.*?</script>|<style.*?</style>|<pre.*?</pre>"
    r"|<ul class=\"docnav.*?</ul>|<div id=\"banner\".*?</div>|<p id=\"title\".*?</p>"
)
_BREAK = re.compile(r"(?i)</(div|p|h\d|li|tr|dt|dd|title)>|<br\s*/?>")


def html_to_text(markup: str) -> str:
    """Prose of an HTML page: one paragraph per line, listings and navigation removed."""
    markup = _DROP.sub(" ", markup)
    markup = _BREAK.sub("\n", markup)
    text = html.unescape(re.sub(r"<[^>]+>", " ", markup))
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if len(line) > 1)


def handbook_dir() -> Path:
    d = Path(os.environ.get("TINYQ_HANDBOOK_DIR", HANDBOOK_DIR))
    if not (d / "index.html").is_file():
        raise FileNotFoundError(
            f"the Debian Administrator's Handbook is not installed (no {d / 'index.html'}); "
            "install it with `sudo apt-get install debian-handbook` or set TINYQ_HANDBOOK_DIR"
        )
    return d


def handbook_pages() -> list:
    """``[(chapter_page, path)]`` in book order, from the table of contents in index.html."""
    d = handbook_dir()
    toc = (d / "index.html").read_text(encoding="utf-8")
    seen, pages, chapter = set(), [], "index"
    for href in re.findall(r'href="([^"#:]+\.html)"', toc):
        if href in seen or href == "index.html" or not (d / href).is_file():
            continue
        seen.add(href)
        if not href.startswith("sect."):
            chapter = href[: -len(".html")]
        pages.append((chapter, d / href))
    return pages


def handbook_text(split: str) -> str:
    """English prose of the handbook: ``split`` is "eval" (chapters 1-8), "calib" (the rest) or "all"."""
    if split not in ("eval", "calib", "all"):
        raise ValueError(f"handbook split must be 'eval', 'calib' or 'all', got {split!r}")
    parts = []
    for chapter, path in handbook_pages():
        is_eval = chapter in EVAL_CHAPTERS
        if split == "all" or (split == "eval") == is_eval:
            parts.append(html_to_text(path.read_text(encoding="utf-8")))
    return "\n".join(parts)


def stdlib_docstrings(max_chars: int = 2_000_000) -> str:
    """Module, class and function docstrings of the Python standard library (sorted by file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if path.name.startswith("test") or "test" in path.parent.name:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(parts)


def read_text_files(paths) -> str:
    """Text of the given files and directories (searched recursively for text and HTML files).
    Errors say "text file", not "calibration": ``tinyq eval --ppl-file`` reads its text here too."""
    files = []
    for p in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + HTML_SUFFIXES)
            if not found:
                raise ValueError(f"directory {p} holds no text files ({', '.join(TEXT_SUFFIXES + HTML_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text file {p} does not exist")
    parts = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        parts.append(html_to_text(raw) if f.suffix.lower() in HTML_SUFFIXES else raw)
    return "\n".join(parts)


def default_calibration_text() -> tuple:
    """``(text, description)``: the handbook's calibration chapters if installed, else stdlib docstrings."""
    try:
        return handbook_text("calib"), f"Debian handbook, calibration chapters ({handbook_dir()})"
    except FileNotFoundError:
        return stdlib_docstrings(), "Python standard-library docstrings (debian-handbook not installed)"


def encode(tokenizer, text: str) -> list:
    """Token ids of ``text`` without special tokens, encoded in paragraph-aligned chunks of ~20 kB
    (one huge call would warn about the model's max length and use much memory)."""
    ids, chunk, size = [], [], 0
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        chunk.append(line)
        size += len(line)
        if size >= 20_000 or i == len(lines) - 1:
            piece = "".join(chunk)
            if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "encode_batch"):
                ids += tokenizer.encode(piece, add_special_tokens=False)
            else:  # a bare `tokenizers.Tokenizer`
                ids += tokenizer.encode(piece, add_special_tokens=False).ids
            chunk, size = [], 0
    return ids


def calibration_blocks(tokenizer, text: str, n_blocks: int = 128, block_len: int = 512, what="calibration text"):
    """``[n_blocks, block_len]`` int64 token blocks cut from ``text``, spread evenly over it.

    Raises ``ValueError`` when the text is too short for the requested blocks.
    """
    if n_blocks < 1 or block_len < 2:
        raise ValueError(f"need n_blocks >= 1 and block_len >= 2, got {n_blocks} x {block_len}")
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    available = ids.numel() // block_len
    if available < n_blocks:
        raise ValueError(
            f"{what} is too short: {ids.numel()} tokens make {available} blocks of {block_len}, but "
            f"{n_blocks} blocks ({n_blocks * block_len} tokens) were requested; give more text "
            "(--calib-file) or fewer/shorter blocks (--calib-blocks / --calib-len)"
        )
    blocks = ids[: available * block_len].view(available, block_len)
    pick = torch.linspace(0, available - 1, n_blocks).round().long()
    return blocks[pick].contiguous()
