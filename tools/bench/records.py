"""JSON records of benchmark runs (``docs/bench/*.json``) and merging a run into an earlier one."""
from __future__ import annotations

import json
from pathlib import Path


def merge_record(previous: Path, record: dict, tables: tuple[str, ...],
                 defaults: tuple[str, ...] = ()) -> dict:
    """``record`` merged into the JSON record at ``previous`` (if there is one): each of its
    ``tables`` (dicts keyed by method or level) updated with the new rows, keys in ``defaults``
    filled where the old record lacks them, the commands joined with ``&&``."""
    if not previous.exists():
        return record
    old = json.loads(previous.read_text())
    for key in defaults:
        old.setdefault(key, record[key])
    for key in tables:
        old.setdefault(key, {}).update(record[key])
    old["command"] += " && " + record["command"]
    return old


def write(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
