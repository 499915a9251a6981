"""Progress of a benchmark run on stderr: a tqdm bar when tqdm is installed and stderr is a terminal,
else one line per record."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Counts records against the planned total; ``record(rec)`` after each one arrives."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar: Any = None
        self.label = ""
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="record", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def describe(self, label: str) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def record(self, rec: dict) -> None:
        self.done += 1
        med = rec.get("median_s")
        text = f"{rec['mode']} {rec['backend']} {rec['precision']}: {rec['status']}" + (
            f" {med:.3g} s" if med is not None else ""
        )
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {self.label}: {text}", file=sys.stderr, flush=True)

    def skip(self, n: int) -> None:
        """Planned records that will not run (their path ran out of memory at a smaller size)."""
        if n <= 0:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
