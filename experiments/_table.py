"""Results as CSV files of typed rows, and the scripts' fixed-width text tables.

A :class:`Table` is a CSV whose columns are the fields of a dataclass (one
row type per file, each defined by the script that writes it). Rows are
appended as they are measured and read back as that dataclass, so a killed
run keeps its rows and a re-run can skip them. :func:`text_table` prints rows
as aligned columns.
"""

from __future__ import annotations

import csv
import dataclasses
import numbers
import os
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

R = TypeVar("R")


def _options(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _from_text(text: str, hint: Any) -> Any:
    """A CSV cell as the field type ``hint``: int, float, bool, str, unions, None as ''."""
    options = _options(hint)
    if text == "" and type(None) in options:
        return None
    for kind in options:
        if kind is bool:
            if text in ("True", "False"):
                return text == "True"
        elif kind is not type(None):
            try:
                return kind(text)
            except ValueError:
                pass
    raise ValueError(f"{text!r} is not a {hint}")


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))  # round-trips exactly; nan and inf as 'nan', 'inf'
    return str(value)


class Table(Generic[R]):
    """A CSV file of typed rows: the columns are the fields of the dataclass ``row``.

    :meth:`append` writes rows as they are measured (flushed and fsynced, so a
    killed run keeps every row it wrote); :meth:`read` returns them as
    ``row`` instances, each cell converted to its field's type (``int``,
    ``float``, ``bool``, ``str``, unions of these; ``None`` is an empty cell).
    A line cut short by a crash is dropped. A file written before fields
    with defaults were added at the end of ``row`` is read with those
    defaults, and gets the new columns when it is next written. A file with
    other columns is never touched: the script exits saying so.

    Example:
      >>> table = Table("results/gradient_flow.csv", FlowRow)
      >>> table.append([row]); rows = table.read()
    """

    def __init__(self, path: str | os.PathLike, row: type[R]):
        if not (isinstance(row, type) and dataclasses.is_dataclass(row)):
            raise TypeError(f"Table(row=...) expects a dataclass type, got {row!r}")
        self.path, self.row = os.fspath(path), row
        hints = typing.get_type_hints(row)
        self.fields = tuple(f.name for f in dataclasses.fields(row))
        self._hints = [hints[name] for name in self.fields]

    def _exists(self) -> bool:
        return os.path.exists(self.path) and os.path.getsize(self.path) > 0

    def _check_columns(self, columns: Sequence[str] | None) -> int:
        """How many of the fields the file holds: all, or a prefix with defaults for the rest."""
        columns = tuple(columns or ())
        n = len(columns)
        defaults = {
            f.name
            for f in dataclasses.fields(self.row)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        if n and columns == self.fields[:n] and defaults.issuperset(self.fields[n:]):
            return n
        raise SystemExit(
            f"{self.path} has columns {list(columns)}, expected {list(self.fields)}; "
            "move it away or pass another --out"
        )

    def read(self) -> list[R]:
        """Every complete row in the file (none if there is no file)."""
        if not self._exists():
            return []
        with open(self.path, newline="") as fh:
            reader = csv.reader(fh)
            n = self._check_columns(next(reader, None))
            lines = [line for line in reader if len(line) == n]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(self._parse(line))
            except ValueError as err:
                if i < len(lines) - 1:  # only the last line can be cut by a crash
                    what = f"{line} is not a {self.row.__name__} ({err})"
                    raise SystemExit(f"{self.path}: {what}") from None
        return rows

    def _parse(self, line: list[str]) -> R:
        return self.row(*(_from_text(t, h) for t, h in zip(line, self._hints, strict=False)))

    def _lines(self, rows: Iterable[R]) -> list[list[str]]:
        out = []
        for r in rows:
            if not isinstance(r, self.row):
                raise TypeError(f"{self.path}: expected a {self.row.__name__}, got {r!r}")
            out.append([_to_text(getattr(r, f)) for f in self.fields])
        return out

    def append(self, rows: Iterable[R]) -> None:
        """Add ``rows`` at the end (with the header if the file is new or empty)."""
        lines = self._lines(rows)
        if self._exists():
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                complete = fh.read() == b"\n"
            if not complete:  # a line cut by a crash: drop it before appending
                self.write(self.read())
            with open(self.path, newline="") as fh:
                n = self._check_columns(next(csv.reader(fh), None))
            if n < len(self.fields):  # an older file: add the new columns
                self.write(self.read())
        else:
            lines.insert(0, list(self.fields))
        self._write(self.path, "a", lines)

    def write(self, rows: Iterable[R]) -> None:
        """Replace the file with ``rows`` (atomically: a crash leaves the old or the new)."""
        tmp = self.path + ".tmp"
        self._write(tmp, "w", [list(self.fields), *self._lines(rows)])
        os.replace(tmp, self.path)

    def drop(self, where: Callable[[R], bool]) -> None:
        """Remove the rows for which ``where(row)`` is true (rewrites only if there are any)."""
        rows = self.read()
        kept = [r for r in rows if not where(r)]
        if len(kept) != len(rows):
            self.write(kept)

    @staticmethod
    def _write(path: str, mode: str, lines: list[list[str]]) -> None:
        with open(path, mode, newline="") as fh:
            csv.writer(fh).writerows(lines)
            fh.flush()
            os.fsync(fh.fileno())


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of :func:`text_table`: its header, width and how a row shows in it.

    ``show(row) -> str``; ``left`` aligns it to the left (default: right);
    ``gap`` is printed before it.
    """

    header: str
    width: int
    show: Callable[[Any], str]
    left: bool = False
    gap: str = ""

    def cell(self, text: str) -> str:
        return self.gap + (f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}")


def text_table(
    rows: Iterable[Any],
    columns: Sequence[Column],
    *,
    key: int,
    status: Callable[[Any], str | None],
    note: Callable[[Any], str],
) -> str:
    """A header, a rule and one line per row, each ended by ``note(row)``.

    The first ``key`` columns name the row; where ``status(row)`` is not None
    (a failed point) the line shows it after them instead of the other columns.
    """
    header = "".join(c.cell(c.header) for c in columns) + "  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        failed = status(r)
        if failed is None:
            line = "".join(c.cell(c.show(r)) for c in columns)
        else:
            line = "".join(c.cell(c.show(r)) for c in columns[:key]) + columns[key].cell(failed)
        lines.append(f"{line}  {note(r)}")
    return "\n".join(lines)
