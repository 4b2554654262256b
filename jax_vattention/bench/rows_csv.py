"""A benchmark's result rows written as CSV."""

from __future__ import annotations

import csv
import os


def write_rows(path: str, rows: list[dict]) -> None:
    """Writes ``rows`` (dicts with the same keys, in order) to ``path`` as CSV, creating its folder,
    and says where."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"rows: {path}")
