"""docs/reliability.md's catalogue stays true to the suite: every test it names exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "reliability.md"
ROW = re.compile(r"^\| (?P<case>[^|]+) \| (?P<behaviour>.+) \| `(?P<file>tests/[\w/]+\.py)::(?P<test>test_\w+)` \|$")


def catalogue_rows() -> list[re.Match]:
    lines = [line for line in CATALOGUE.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [ROW.match(line) for line in lines if not line.startswith("| case |")]


def test_every_row_reads_case_behaviour_test():
    rows = catalogue_rows()
    assert len(rows) >= 30 and all(rows), [i for i, row in enumerate(rows) if row is None]


def test_every_test_the_catalogue_names_exists():
    for row in catalogue_rows():
        source = (ROOT / row["file"]).read_text()
        assert re.search(rf"^def {row['test']}\(", source, flags=re.MULTILINE), f"{row['file']}::{row['test']}"
