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


def _read_lines(
    path: PathLike,
    parse: Callable[[str], Row],
    expected: str,
    header: Sequence[str] = (),
    header_required: bool = False,
    separator: str = ",",
) -> List[Row]:
    rows: List[Row] = []
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
                rows.append(parse(line))
            except (ValueError, IndexError):
                raise DataFormatError(path, line_number, expected, line) from None
    return rows


def _parse_ml1m(line: str) -> Row:
    fields = line.split("::")
    if len(fields) != 4:
        raise ValueError("field count")
    user, item, rating, ts = fields
    _parse_int(user), _parse_int(item), _parse_rating(rating)
    return user.strip(), item.strip(), _parse_int(ts)


def _parse_ml20m(line: str) -> Row:
    fields = line.split(",")
    if len(fields) != 4:
        raise ValueError("field count")
    user, item, rating, ts = fields
    _parse_int(user), _parse_int(item), _parse_rating(rating)
    return user.strip(), item.strip(), _parse_int(ts)


def _parse_csv(line: str) -> Row:
    fields = line.split(",")
    if len(fields) != 3:
        raise ValueError("field count")
    user, item, ts = (x.strip() for x in fields)
    if not user or not item:
        raise ValueError("empty id")
    return user, item, _parse_int(ts)


def _vocab(raw: np.ndarray) -> Tuple[List[str], np.ndarray]:
    """Sorted unique raw ids (numeric order if all are integers) and each row's index."""
    uniques, inverse = np.unique(raw, return_inverse=True)
    if all(u.isdigit() for u in uniques):
        order = np.argsort(uniques.astype(np.int64), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        return [str(u) for u in uniques[order]], rank[inverse]
    return [str(u) for u in uniques], inverse


def rows_to_dataset(rows: Sequence[Row]) -> SequenceDataset:
    """``(user, item, timestamp)`` rows -> per-user time-sorted :class:`SequenceDataset`."""
    if not rows:
        raise ValueError("no interactions: the input has no data lines")
    users_raw = np.array([r[0] for r in rows])
    items_raw = np.array([r[1] for r in rows])
    times = np.array([r[2] for r in rows], dtype=np.int64)
    user_vocab, users = _vocab(users_raw)
    item_vocab, items = _vocab(items_raw)
    order = np.lexsort((np.arange(len(rows)), times, users))  # user, then time, then file order
    lengths = np.bincount(users, minlength=len(user_vocab))
    return SequenceDataset(
        item_ids=torch.from_numpy(items[order].astype(np.int64)),
        timestamps=torch.from_numpy(times[order]),
        offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        num_items=len(item_vocab),
        item_vocab=item_vocab,
        user_vocab=user_vocab,
    )


def read_movielens_1m(path: PathLike) -> SequenceDataset:
    """MovieLens-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)."""
    return rows_to_dataset(_read_lines(path, _parse_ml1m, "'UserID::MovieID::Rating::Timestamp' with integer ids and timestamp"))


def read_movielens_20m(path: PathLike) -> SequenceDataset:
    """MovieLens-20M ``ratings.csv`` (header ``userId,movieId,rating,timestamp``)."""
    rows = _read_lines(
        path,
        _parse_ml20m,
        "'userId,movieId,rating,timestamp' with integer ids and timestamp",
        header=("userId", "movieId", "rating", "timestamp"),
        header_required=True,
    )
    return rows_to_dataset(rows)


def read_interactions_csv(path: PathLike) -> SequenceDataset:
    """Generic ``user,item,timestamp`` CSV (optional header with those names)."""
    rows = _read_lines(
        path,
        _parse_csv,
        "'user,item,timestamp' with non-empty ids and an integer timestamp",
        header=("user", "item", "timestamp"),
    )
    return rows_to_dataset(rows)


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
