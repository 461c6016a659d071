"""The outcome of an indexing run, with its one-line summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["IndexReport"]


@dataclass
class IndexReport:
    """Counts of one run, per item (an image path, or a text line / record).

    ``seen == indexed + unchanged + duplicates + skipped``:
    indexed: embedded in this run (one per new content);
    unchanged: already in the index with the same content;
    duplicates: the same content as another item, already in the index or embedded in this run
    (not embedded again; the item's path is kept on that row);
    skipped: unusable, with ``(where, reason)`` in ``skipped_reasons``;
    removed: items of the index that are gone (deleted files, lines no longer there).
    """

    table: str = ""
    version: str = ""  # the table version written (indexer.versions)
    activated: bool = False  # whether this run made it the active version
    seen: int = 0
    indexed: int = 0
    unchanged: int = 0
    duplicates: int = 0
    removed: int = 0
    skipped: int = 0
    skipped_reasons: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        line = (
            f"{self.table}: seen {self.seen:,}, indexed {self.indexed:,}, unchanged "
            f"{self.unchanged:,}, duplicates {self.duplicates:,}, removed {self.removed:,}, "
            f"skipped {self.skipped:,} in {self.elapsed_s:.1f} s"
        )
        if self.indexed and self.elapsed_s > 0:
            line += f" ({self.indexed / self.elapsed_s:,.0f} embedded/s)"
        if self.skipped_reasons:
            kinds = Counter(reason.split(" (")[0] for _, reason in self.skipped_reasons)
            line += "; skipped: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(4))
            if len(kinds) > 4:
                line += ", ..."
        return line
