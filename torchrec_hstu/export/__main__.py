"""``python -m torchrec_hstu.export``: see :mod:`torchrec_hstu.export.command`."""

from torchrec_hstu.cli import run_cli
from torchrec_hstu.export.command import main

if __name__ == "__main__":
    run_cli(main)
