"""Reading docs/protocol.md the way the tests check it against the code."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def section(number: str) -> str:
    """The text of one numbered section of docs/protocol.md (up to the next section of that level)."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {number}. ")
    return text[start : text.index("\n## ", start + 1)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in ``text``, header and rule rows left out."""
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| ")
    ]
    return [
        row for row in rows if not set("".join(row)) <= {"-", " "} and row[0] not in ("Topic", "Check", "Key")
    ]
