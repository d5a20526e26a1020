"""The README and docs/ name only files that exist in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
#: a Markdown link to a relative target (anchors and URLs left out)
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)")
#: a path in backticks under one of the repository's top folders
PATH = re.compile(r"`((?:sidecar|tests|docs|config|deploy|bench|requirements)/[\w./-]+\.\w+)`")


def test_every_named_file_exists() -> None:
    """Each relative link and each backticked repository path in the README and docs/ names a
    file that is in the repository (a moved or deleted file must take its mentions along)."""
    missing = []
    for page in PAGES:
        if not page.exists():
            continue
        text = page.read_text()
        for target in LINK.findall(text):
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: link {target}")
        for name in PATH.findall(text):
            if "*" not in name and not (ROOT / name).exists():
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)


def test_readme_links_every_topic_page() -> None:
    """The README is the entry: every page under docs/ is reachable from it."""
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, unlinked
