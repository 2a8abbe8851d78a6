"""The documentation cannot drift: docs/config.md is what scripts/config_reference.py writes from
the code, the README's results blocks are what scripts/update_readme.py copies from
benchmarks/results, and every relative link in docs/*.md and README.md points to an existing file (and,
inside docs/, to an existing heading). Fast: no compilation."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = DOCS + [ROOT / "README.md"]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(path: Path) -> list:
    return [m.group(1) for m in LINK.finditer(_prose(path.read_text()))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_readme_results_blocks_are_the_results_files():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_readme.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_excerpt_stops_at_the_marker(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from scripts import update_readme

    (tmp_path / "long.md").write_text(
        f"# Title\n\n| a |\n|---|\n| 1 |\n\n{update_readme.README_EXCERPT_END}\n\n## Details\nmore\n"
    )
    monkeypatch.setattr(update_readme, "RESULTS", tmp_path)
    text = update_readme.section("long")
    assert "| 1 |" in text and "Details" not in text and "which has the details" in text
    assert "Not measured yet" in update_readme.section("missing")


def test_config_reference_is_up_to_date():
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        "docs/config.md does not match the config dataclasses: run `python scripts/config_reference.py` "
        f"and commit the result.\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "system_model.md", "config.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
            continue
        if anchor and dest.suffix == ".md" and dest.parent == ROOT / "docs" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"broken links in {page.relative_to(ROOT)}: " + "; ".join(broken)
