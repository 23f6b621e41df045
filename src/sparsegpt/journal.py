"""Rows of a long measurement (a sweep) kept on disk as they are measured, so an interrupted run continues.

The journal lives in the sibling folder ``.<out>.sparsegpt-rows`` (``formats.atomic.partial_folder``):
``settings.json`` (what the rows were measured with) and ``rows.jsonl``
(one finished row a line, each flushed to disk before the next is started). The output itself is still
written atomically at the end, after which the journal is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.atomic import partial_folder, write_json_atomically

SETTINGS_NAME = "settings.json"
ROWS_NAME = "rows.jsonl"


class RowJournal:
    """The finished rows of a run to ``out`` with ``settings`` (JSON-serialisable).

    Opening it finds an interrupted run's rows: with ``resume`` they are kept (``rows``) when the settings
    are the same, and refused with one line naming what changed when they are not; without ``resume`` an
    interrupted run is refused unless ``overwrite`` starts over. A row cut short by a kill (a last line
    without its end) is dropped: it is measured again.
    """

    def __init__(self, out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
        self.folder = partial_folder(out, "rows")
        self.settings = json.loads(json.dumps(settings))  # as it reads back from settings.json
        self.rows: list[dict[str, Any]] = []
        if (self.folder / SETTINGS_NAME).is_file() and not overwrite:
            complete = self._complete_lines()
            self.rows = [json.loads(line) for line in complete.splitlines() if line]
            if not resume:
                raise SparseGPTError(
                    f"an interrupted run to this output is at {self.folder} ({len(self.rows)} rows measured): "
                    "use --resume to continue it, or --overwrite to start again"
                )
            saved = json.loads((self.folder / SETTINGS_NAME).read_text())
            if saved != self.settings:
                keys = self.settings.keys() | saved.keys()
                changed = sorted(key for key in keys if self.settings.get(key) != saved.get(key))
                raise SparseGPTError(
                    f"cannot resume {self.folder}: it was measured with different {', '.join(changed)}; "
                    "use --overwrite to start again"
                )
            rows_file = self.folder / ROWS_NAME
            if rows_file.is_file() and rows_file.read_text() != complete:
                rows_file.write_text(complete)  # the torn line goes before the next row is appended
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir()
        write_json_atomically(self.folder / SETTINGS_NAME, self.settings)

    def _complete_lines(self) -> str:
        """The rows file up to its last line end: a last line without its end was cut short by a kill, and
        its row is measured again."""
        path = self.folder / ROWS_NAME
        text = path.read_text() if path.is_file() else ""
        return text[: text.rfind("\n") + 1]

    def append(self, row: dict[str, Any]) -> None:
        """Keep ``row`` on disk (flushed and synced) before the run goes on."""
        with (self.folder / ROWS_NAME).open("a") as sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        self.rows.append(row)

    def remove(self) -> None:
        """The output is written: the journal is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
