"""docs/architecture.md cannot rot: every file it names exists, and every test it names
(``path::test_name``) is a test function of that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "operator" / "imageunlock"
# A backticked file name: a path with an extension, optionally ::a_test_function.
NAMED = re.compile(r"`([\w./-]+\.(?:py|md|yaml|yml|json|toml))(?:::(\w+))?`")


def named() -> list[tuple[str, str | None]]:
    return [(path, test or None) for path, test in NAMED.findall(DOC.read_text())]


def resolve(path: str) -> Path | None:
    """From the repository root, or (a short path) from the package's folder."""
    return next((base / path for base in (ROOT, PACKAGE) if (base / path).is_file()), None)


def test_the_doc_names_files_and_tests():
    found = named()
    assert len({p for p, _ in found}) > 30 and sum(1 for _, t in found if t) >= 8  # the check has something to hold


def test_every_file_the_doc_names_exists():
    assert [path for path, _ in named() if resolve(path) is None] == []


def test_every_test_the_doc_names_exists():
    missing = []
    for path, test in named():
        file = resolve(path)
        if test and (file is None or not re.search(rf"^def {test}\(", file.read_text(), re.MULTILINE)):
            missing.append(f"{path}::{test}")
    assert missing == []


def test_the_recipes_name_the_test_only_adapters_that_the_registries_point_to():
    """The registries' docstrings send a newcomer to docs/architecture.md and to these fakes."""
    doc = DOC.read_text()
    for registry, fake in (
        ("engine/runtimes/__init__.py", "tests/support/fake_runtime.py"),
        ("engine/keys/__init__.py", "tests/support/fake_key_source.py"),
    ):
        source = (PACKAGE / registry).read_text()
        assert "docs/architecture.md" in source and fake in source, registry
        assert f"`{fake}`" in doc
