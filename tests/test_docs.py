"""The README, docs and sources cite their sources by name, not files that are not in the repository."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED = ["README.md", "docs", "tinyq", "tests", "examples", "scripts"]


def _files():
    for entry in CHECKED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
        for folder, _, names in os.walk(path):
            yield from (os.path.join(folder, n) for n in names if n.endswith((".md", ".py", ".sh")))


def test_cited_markdown_files_exist():
    missing = []
    for path in _files():
        if path == os.path.abspath(__file__):
            continue
        for name in set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", open(path, encoding="utf-8").read())):
            if not any(os.path.isfile(os.path.join(folder, name)) for folder in (ROOT, os.path.join(ROOT, "docs"))):
                missing.append(f"{os.path.relpath(path, ROOT)} cites {name}")
    assert not missing, missing
