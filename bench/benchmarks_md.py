"""Write one benchmark's section into BENCHMARKS.md (replacing the section of the same heading)."""

from __future__ import annotations

from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, text: str, path: Path = PATH) -> None:
    """Replace the section that starts with ``heading`` (up to the next ``## ``) by ``text``, or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading in old:
        head, rest = old.split(heading, 1)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def publish(heading: str, intro: str, rows: list[str], write: bool) -> None:
    """The section ``heading``, ``intro`` (the command and how to read the table), ``rows``: printed, and
    written into BENCHMARKS.md when ``write``."""
    text = "\n".join([heading, "", intro, "", *rows, ""])
    print(text)
    if write:
        write_section(heading, text)
