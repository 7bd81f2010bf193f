"""JSON records of benchmark runs (``docs/bench/*.json``) and merging a run into an earlier one."""
from __future__ import annotations

import json
from pathlib import Path


def merge_record(previous: Path, record: dict, tables: tuple[str, ...],
                 defaults: tuple[str, ...] = ()) -> dict:
    """``record`` merged into the JSON record at ``previous`` (if there is one): each of its
    ``tables`` (dicts keyed by method or level) updated with the new rows, a row of per-level
    cells level by level (:func:`_by_level`), keys in ``defaults`` filled where the old record
    lacks them, the commands joined with ``&&``."""
    if not previous.exists():
        return record
    old = json.loads(previous.read_text())
    for key in defaults:
        old.setdefault(key, record[key])
    for key in tables:
        table = old.setdefault(key, {})
        for name, value in record[key].items():
            table[name] = _by_level(table.get(name), value)
    old["command"] += " && " + record["command"]
    return old


def _by_level(old: object, new: object) -> object:
    """``new``, or where both are rows of per-level cells (dicts with a ``level``), the old row
    with the new cells in place of those at the same levels, highest level first: a rerun at
    one level (``--levels 0.6``) adds or replaces that cell and keeps the row's others."""
    def cells(row: object) -> bool:
        return isinstance(row, list) and all(isinstance(c, dict) and "level" in c for c in row)

    if not (cells(old) and cells(new)):
        return new
    levels = {c["level"]: c for c in old}
    levels.update({c["level"]: c for c in new})
    return [levels[k] for k in sorted(levels, reverse=True)]


def write(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
