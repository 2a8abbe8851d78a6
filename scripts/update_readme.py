"""Copy the committed benchmark tables into README.md between their markers.

    python scripts/update_readme.py            # rewrite the README's results blocks
    python scripts/update_readme.py --check    # exit 1 if one is stale

Every figure in the README comes from a results file written by a script in benchmarks/ or
scripts/; this copies `benchmarks/results/NAME.md` (its table and notes, not its title) between
`<!-- results:NAME -->` and `<!-- /results:NAME -->`, up to a line README_EXCERPT_END where a long
file has one (its details stay in the file, which the README links). A marker whose file does not
exist yet is filled with a line saying so, never with numbers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README_EXCERPT_END = "<!-- end of the README excerpt -->"
MARKER = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /results:(?P=name) -->)", re.S)


def section(name: str) -> str:
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        return f"_Not measured yet: run the script that writes `benchmarks/results/{name}.md`._\n"
    lines = path.read_text().split(README_EXCERPT_END)[0].splitlines()
    body = [line for line in lines if not line.startswith("# ")]
    while body and not body[0].strip():
        body.pop(0)
    cut = README_EXCERPT_END in path.read_text()
    source = f"[`benchmarks/results/{name}.md`](benchmarks/results/{name}.md)"
    return "\n".join(body).rstrip() + f"\n\n_From {source}{', which has the details' if cut else ''}._\n"


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = MARKER.sub(lambda m: m.group(1) + section(m.group("name")) + m.group(4), text)
    if new == text:
        print("README.md already up to date")
        return 0
    if "--check" in sys.argv[1:]:
        print("README.md's results blocks are stale: run python scripts/update_readme.py")
        return 1
    readme.write_text(new)
    print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
