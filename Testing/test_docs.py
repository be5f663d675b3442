"""The project's Markdown pages link to each other by file and heading: every such link must land on a file that
exists and, where it names one, on a heading of that file (GitHub's anchor rule)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "Resources" / "Models").glob("*.md")), *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def local_links(page: Path):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        yield target, (page.parent / path if path else page), anchor


def test_github_anchor_rule():
    assert github_anchor(" Ablation: cached copies of kvasir-polyp (4 vs 6, same 90-minute budget)") == \
        "ablation-cached-copies-of-kvasir-polyp-4-vs-6-same-90-minute-budget"
    assert github_anchor("Weight averaging of kvasir-polyp's lineage") == "weight-averaging-of-kvasir-polyps-lineage"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_local_links_resolve(page):
    bad = []
    for target, path, anchor in local_links(page):
        if not path.exists():
            bad.append(f"{target}: no file {path.relative_to(ROOT)}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pages_name_commits_not_sessions(page):
    """Figures are dated or named by commit ("2026-12-05, 37547c8"), never by the work session that produced them."""
    found = [f"{n}: {line.strip()[:100]}" for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\b(sessions?[ -]\d|this\s+session|the session's)", line, re.IGNORECASE)]
    assert not found, f"{page.relative_to(ROOT)} speaks of sessions:\n" + "\n".join(found)
