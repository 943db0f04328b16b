"""torchrec_hstu.cli: one line and exit status 2 for a user error, traceback with --debug."""

import os
import subprocess
import sys
import textwrap

import pytest

from torchrec_hstu.cli import UserError, error_line, run_cli


def _main_raising(exc: BaseException):
    def main(argv=None) -> int:
        if argv and "--ok" in argv:
            return 0
        raise exc

    return main


@pytest.mark.parametrize(
    "exc",
    [UserError("--config: bad"), ValueError("bad\nvalue"), FileNotFoundError("checkpoint not found: x.pt")],
)
def test_user_error_is_one_line_and_exit_2(exc, capsys, monkeypatch):
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(_main_raising(exc), [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err


def test_status_passes_through_and_debug_is_removed(monkeypatch):
    seen = []

    def main(argv=None) -> int:
        seen.append(list(argv))
        return 3

    with pytest.raises(SystemExit) as info:
        run_cli(main, ["--debug", "--x", "1"])
    assert info.value.code == 3 and seen == [["--x", "1"]]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, capsys, monkeypatch):
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    argv = ["--debug"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("TORCHREC_HSTU_DEBUG", "1")
    with pytest.raises(SystemExit) as info:
        run_cli(_main_raising(ValueError("bad")), argv)
    assert info.value.code == 2
    assert "Traceback" in capsys.readouterr().err


def test_other_errors_keep_their_traceback():
    with pytest.raises(RuntimeError):
        run_cli(_main_raising(RuntimeError("a bug")), [])


def test_error_line_folds_lines():
    assert error_line(ValueError("a\n  b\n")) == "error: a b"
    assert error_line(ValueError()) == "error: ValueError"


def test_script_exit_status_in_a_process():
    code = textwrap.dedent(
        """
        from torchrec_hstu.cli import run_cli
        def main(argv=None):
            raise FileNotFoundError("input file not found: nope.jsonl")
        run_cli(main)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TORCHREC_HSTU_DEBUG"})
    assert done.returncode == 2
    assert done.stderr == "error: input file not found: nope.jsonl\n"
