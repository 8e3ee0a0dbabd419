"""Regenerate the generated parts of docs/ (or, with --check, list what is stale and exit 1).

    python docs/gen_docs.py            # rewrite
    python docs/gen_docs.py --check    # what tests/unit/test_recipes.py asserts

- docs/config.md: the config reference, ``raylign config-docs`` (``config_reference_markdown()``);
- docs/migration-from-trl.md: the TRL -> raylign table (docs/gen_migration.py);
- the recipe blocks of the method pages: the text between ``<!-- recipe: jobs/X.yaml -->`` and
  ``<!-- end recipe -->`` is the recipe file, verbatim, in a yaml fence.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
METHOD_PAGES = ("sft.md", "dpo.md", "mpo.md", "grpo.md", "gspo.md")
RECIPE_BLOCK = re.compile(r"(<!-- recipe: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end recipe -->)", re.DOTALL)


def recipe_block(recipe_text: str) -> str:
    """What goes between the markers: the recipe in a yaml fence."""
    return f"```yaml\n{recipe_text.rstrip()}\n```\n"


def with_recipes(page: str, root: Path = ROOT) -> str:
    """`page` with every recipe block replaced by the current recipe file."""
    def fill(m: re.Match) -> str:
        recipe = root / m.group("path")
        if not recipe.is_file():
            raise FileNotFoundError(f"recipe block names {m.group('path')}, which does not exist")
        return m.group(1) + recipe_block(recipe.read_text()) + m.group(4)

    return RECIPE_BLOCK.sub(fill, page)


def _config_md() -> str:
    from raylign.config import config_reference_markdown

    return config_reference_markdown().rstrip() + "\n"


def _migration_md() -> str:
    sys.path.insert(0, str(DOCS))
    from gen_migration import migration_markdown

    return migration_markdown().rstrip() + "\n"


def generated(names: tuple[str, ...] | None = None) -> dict[Path, Callable[[], str]]:
    """Each generated file and a function returning its expected text."""
    out: dict[Path, Callable[[], str]] = {DOCS / "config.md": _config_md, DOCS / "migration-from-trl.md": _migration_md}
    for page in METHOD_PAGES:
        path = DOCS / page
        out[path] = lambda path=path: with_recipes(path.read_text())
    return {p: f for p, f in out.items() if names is None or p.name in names}


def stale(names: tuple[str, ...] | None = None) -> list[Path]:
    """Generated files whose text differs from what they should be (trailing blank lines aside:
    `raylign config-docs > docs/config.md` adds one)."""
    return [p for p, make in generated(names).items() if not p.is_file() or p.read_text().rstrip() != make().rstrip()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        old = stale()
        for p in old:
            print(f"stale: {p.relative_to(ROOT)} (run: python docs/gen_docs.py)")
        return 1 if old else 0
    for path, make in generated().items():
        path.write_text(make())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
