"""Readers for real interaction logs: MovieLens-1M, MovieLens-20M and a generic CSV.

Every reader returns a :class:`~torchrec_hstu.data.sequences.SequenceDataset`: one sequence
per user sorted by timestamp (ties keep file order), items renumbered ``0..N-1`` in sorted
order of their raw ids (numeric order when all ids are integers). Ratings are ignored: every
rating counts as an interaction, as in the GR / SASRec MovieLens setups.

Formats (selected by name in :func:`read_interactions`):

* ``ml-1m``: ``ratings.dat``, lines ``UserID::MovieID::Rating::Timestamp``.
* ``ml-20m``: ``ratings.csv``, header ``userId,movieId,rating,timestamp`` then one rating a line.
* ``csv``: ``user,item,timestamp`` (optional header with those names; ids may be any
  non-empty strings, timestamps integers).

A malformed line raises :class:`DataFormatError` naming the file and the line number.
"""

import os
from array import array
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from torchrec_hstu.data.sequences import SequenceDataset

PathLike = Union[str, "os.PathLike[str]"]

#: Names accepted by :func:`read_interactions`.
FORMATS = ("ml-1m", "ml-20m", "csv")


class DataFormatError(ValueError):
    """A line of an input file does not have the expected format."""

    def __init__(self, path: PathLike, line_number: int, expected: str, line: str) -> None:
        shown = line if len(line) <= 120 else line[:117] + "..."
        super().__init__(f"{os.fspath(path)}:{line_number}: expected {expected}; got {shown!r}")
        self.path = os.fspath(path)
        self.line_number = line_number


def _parse_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("negative")
    return value


def _parse_rating(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError("not finite")
    return value


Row = Tuple[str, str, int]


class _Interactions:
    """Accumulates ``(user, item, timestamp)`` rows compactly: raw ids are interned to ints as
    they come (first-appearance order) and stored in int64 arrays, so MovieLens-20M's 20M rows
    take about 0.5 GB instead of tens of bytes per Python object."""

    def __init__(self) -> None:
        self.user_index: Dict[str, int] = {}
        self.item_index: Dict[str, int] = {}
        self.users = array("q")
        self.items = array("q")
        self.times = array("q")

    def add(self, row: Row) -> None:
        user, item, ts = row
        self.users.append(self.user_index.setdefault(user, len(self.user_index)))
        self.items.append(self.item_index.setdefault(item, len(self.item_index)))
        self.times.append(ts)

    @staticmethod
    def _sorted_vocab(index: Dict[str, int]) -> Tuple[List[str], np.ndarray]:
        """Raw ids sorted (numerically when all are integers) and the new id of each interned id."""
        raw = list(index)  # interned order
        numeric = all(r.isdigit() for r in raw)
        order = sorted(range(len(raw)), key=(lambda k: int(raw[k])) if numeric else (lambda k: raw[k]))
        new_id = np.empty(len(raw), dtype=np.int64)
        new_id[np.asarray(order, dtype=np.int64)] = np.arange(len(raw), dtype=np.int64)
        return [raw[k] for k in order], new_id

    def dataset(self) -> SequenceDataset:
        """Per-user time-sorted :class:`SequenceDataset` (ties keep file order)."""
        if len(self.times) == 0:
            raise ValueError("no interactions: the input has no data lines")
        user_vocab, user_ids = self._sorted_vocab(self.user_index)
        item_vocab, item_ids = self._sorted_vocab(self.item_index)
        users = user_ids[np.frombuffer(self.users, dtype=np.int64)]
        items = item_ids[np.frombuffer(self.items, dtype=np.int64)]
        times = np.frombuffer(self.times, dtype=np.int64).copy()
        order = np.lexsort((np.arange(times.size), times, users))  # user, then time, then file order
        lengths = np.bincount(users, minlength=len(user_vocab))
        return SequenceDataset(
            item_ids=torch.from_numpy(items[order]),
            timestamps=torch.from_numpy(times[order]),
            offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
            num_items=len(item_vocab),
            item_vocab=item_vocab,
            user_vocab=user_vocab,
        )


def _read_lines(
    path: PathLike,
    parse: Callable[[str], Row],
    expected: str,
    header: Sequence[str] = (),
    header_required: bool = False,
    separator: str = ",",
) -> SequenceDataset:
    rows = _Interactions()
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        for line_number, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line_number == 1 and header:
                names = [x.strip().lower() for x in line.split(separator)]
                if names == [h.lower() for h in header]:
                    continue
                if header_required:
                    raise DataFormatError(path, 1, f"the header {separator.join(header)!r}", line)
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no interaction
            try:
                row = parse(line)
            except (ValueError, IndexError):
                raise DataFormatError(path, line_number, expected, line) from None
            rows.add(row)
    return rows.dataset()


def _parse_movielens(line: str, separator: str) -> Row:
    """A ``user, item, rating, timestamp`` MovieLens line (ML-1M: ``::``, ML-20M: ``,``)."""
    fields = line.split(separator)
    if len(fields) != 4:
        raise ValueError("field count")
    user, item, rating, ts = fields
    _parse_int(user), _parse_int(item), _parse_rating(rating)
    return user.strip(), item.strip(), _parse_int(ts)


def _parse_ml1m(line: str) -> Row:
    return _parse_movielens(line, "::")


def _parse_ml20m(line: str) -> Row:
    return _parse_movielens(line, ",")


def _parse_csv(line: str) -> Row:
    fields = line.split(",")
    if len(fields) != 3:
        raise ValueError("field count")
    user, item, ts = (x.strip() for x in fields)
    if not user or not item:
        raise ValueError("empty id")
    return user, item, _parse_int(ts)


def read_movielens_1m(path: PathLike) -> SequenceDataset:
    """MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)."""
    return _read_lines(path, _parse_ml1m, "'UserID::MovieID::Rating::Timestamp' with integer ids and timestamp")


def read_movielens_20m(path: PathLike) -> SequenceDataset:
    """MovieLens-20M ``ratings.csv`` (header ``userId,movieId,rating,timestamp``)."""
    return _read_lines(
        path,
        _parse_ml20m,
        "'userId,movieId,rating,timestamp' with integer ids and timestamp",
        header=("userId", "movieId", "rating", "timestamp"),
        header_required=True,
    )


def read_interactions_csv(path: PathLike) -> SequenceDataset:
    """Generic ``user,item,timestamp`` CSV (optional header with those names)."""
    return _read_lines(
        path,
        _parse_csv,
        "'user,item,timestamp' with non-empty ids and an integer timestamp",
        header=("user", "item", "timestamp"),
    )


_READERS: Dict[str, Callable[[PathLike], SequenceDataset]] = {
    "ml-1m": read_movielens_1m,
    "ml-20m": read_movielens_20m,
    "csv": read_interactions_csv,
}


def read_interactions(data_format: str, path: PathLike) -> SequenceDataset:
    """Read ``path`` in ``data_format`` (one of :data:`FORMATS`).

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "log.csv")
        >>> _ = open(p, "w").write("user,item,timestamp\\nu1,a,2\\nu1,b,1\\n")
        >>> read_interactions("csv", p).item_ids.tolist()
        [1, 0]
    """
    if data_format not in _READERS:
        raise ValueError(f"data_format must be one of {FORMATS}; got {data_format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{data_format} input file not found: {os.fspath(path)}")
    return _READERS[data_format](path)
