"""metrics.jsonl as records, for the report and the planner's calibration."""
from __future__ import annotations

import json


def jsonl_records(text: str, source: str) -> list[dict]:
    """One dict per non-empty line; a last line cut short (a killed run) is left out, any other bad
    line raises ValueError naming `source` and the line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{source}: line {number} is not JSON ({err})") from err
    return records
