"""The course's documents point only at notebooks that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.stem)
def test_links_to_notebooks_resolve(doc: Path) -> None:
    links = re.findall(r"\]\((\.\./notebooks/[^)#]+)", doc.read_text())
    assert links, f"{doc.name} links to no notebook"
    missing = sorted({link for link in links if not (doc.parent / link).exists()})
    assert not missing, f"{doc.name} links to notebooks that do not exist: {missing}"


def test_glossary_reaches_every_notebook() -> None:
    glossary = (REPO / "docs" / "glossary.md").read_text()
    untaught = [nb.name for nb in sorted((REPO / "notebooks").glob("[0-9]*.ipynb")) if nb.name not in glossary]
    assert not untaught, f"no glossary term points at {untaught}"
