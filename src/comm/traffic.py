"""Bytes moved by the dispatchers, by link class: `nvlink` (inside a node) and `ib` (between nodes).

Counted from the real split sizes of every exchange, on the sending side; rows a rank keeps for
itself cross no link and are not counted.
"""
from __future__ import annotations

from typing import Optional, Sequence

LINKS = ("nvlink", "ib")


class TrafficCounter:
    def __init__(self) -> None:
        self.bytes = dict.fromkeys(LINKS, 0)

    def add(self, rows_per_dest: Sequence[int], bytes_per_row: int, link_per_dest: Sequence[Optional[str]]) -> None:
        for rows, link in zip(rows_per_dest, link_per_dest):
            if link is not None:
                self.bytes[link] += int(rows) * bytes_per_row

    def take(self) -> dict[str, int]:
        """The bytes counted since the last call, then reset."""
        out, self.bytes = self.bytes, dict.fromkeys(LINKS, 0)
        return out
