"""The edge every command shares: one-line user errors, safe reads of user files, whole writes.

A user error (a bad argument, a missing or malformed file, a checkpoint that does not fit the
model, a request outside what the package accepts) ends the program with exactly one line on
stderr, ``error: <what, where, what was expected>``, and exit status 2, the status argparse
already uses for bad arguments. Anything else (a bug, an out-of-memory, a kernel failure) keeps
its traceback. ``--debug`` on the command line or ``TORCHREC_HSTU_DEBUG=1`` in the environment
shows the traceback of a user error too.

User errors are :class:`UserError` (this package's own), ``ValueError`` and the ``OSError``
subclasses a wrong path raises (``FileNotFoundError``, ``IsADirectoryError``,
``NotADirectoryError``, ``PermissionError``).

Example::

    >>> def main(argv=None) -> int:
    ...     raise UserError("--config: file not found: missing.pbtxt")
    >>> run_cli(main, [])  # doctest: +SKIP
    error: --config: file not found: missing.pbtxt     (on stderr; exit status 2)

A script's ``__main__`` block::

    if __name__ == "__main__":
        run_cli(main)

Files at the edge (export, predict, the distributed checkpoints):

* :func:`load_torch_file`: ``torch.load(weights_only=True)`` whose every failure is one
  :class:`UserError` naming the file (truncated, not torch's, holds code: refused, never run).
* :func:`file_sha256`: the digest that names a package or a checkpoint file.
* :func:`write_atomic` / :func:`temporary_path`: write through a temporary file in the same
  folder and a rename, so a reader sees the old content (or none) or all of the new one.
"""

import argparse
import hashlib
import os
import pickle
import re
import sys
import traceback
import uuid
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple, Type

__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "UserError",
    "add_debug_flag",
    "error_line",
    "file_sha256",
    "load_torch_file",
    "run_cli",
    "temporary_path",
    "write_atomic",
]

DEBUG_ENV = "TORCHREC_HSTU_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """An input the user can fix: the message says what, where and what was expected.

    A ``ValueError`` subclass, so code that already catches ``ValueError`` keeps working.
    """


USER_ERRORS: Tuple[Type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def error_line(err: BaseException) -> str:
    """The one-line ``error: ...`` text for ``err`` (its message with line breaks folded).

    Args:
        err: the exception.

    Returns:
        ``"error: <message>"`` on a single line; the exception type's name if it has no message.
    """
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return f"error: {text or type(err).__name__}"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Lists ``--debug`` in ``parser``'s help (``run_cli`` reads and removes it before parsing).

    Args:
        parser: the entry point's parser.
    """
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"show the Python traceback of a user error (also: {DEBUG_ENV}=1)",
    )


def _debug_requested(argv: Sequence[str]) -> Tuple[bool, List[str]]:
    """``(debug?, argv without --debug)``; tokens after ``--`` are left alone."""
    rest: List[str] = []
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    for index, token in enumerate(argv):
        if token == "--":
            rest.extend(argv[index:])
            break
        if token == DEBUG_FLAG:
            debug = True
        else:
            rest.append(token)
    return debug, rest


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Runs ``main(argv)`` and exits with its status; a user error exits 2 with one line.

    Args:
        main: the entry point; takes the argument list (without the program name) and returns
            an exit status (an int; anything else, e.g. ``None`` or a result dict, counts as 0).
            argparse errors (``SystemExit``) pass through.
        argv: the arguments; default ``sys.argv[1:]``. ``--debug`` is removed before ``main``
            sees it.

    Raises:
        SystemExit: always: ``main``'s status, 2 after a user error, 130 after Ctrl-C.
    """
    debug, rest = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        status = main(rest)
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        else:
            print(error_line(err), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        else:
            print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


# -- files at the edge ----------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_path(final: str, suffix: str = ".tmp") -> str:
    """A fresh hidden name beside ``final`` (same file system, so a rename onto ``final`` is atomic).

    Args:
        final: the path the file will be renamed to.
        suffix: end of the name (e.g. ``".pt2"`` where a writer checks the extension).
    """
    directory = os.path.dirname(os.path.abspath(final))
    return os.path.join(directory, f".{os.path.basename(final)}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename.

    Args:
        path: the destination; a reader sees its old content (or none) or all of ``text``.
        text: the content (UTF-8).
    """
    temporary = temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_torch_file(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one clear error per failure.

    Args:
        path: the file.
        what: what the file is, for the messages (``"checkpoint"``).

    Returns:
        The loaded object (tensors and plain containers only).

    Raises:
        FileNotFoundError: no such file.
        UserError: the file is truncated or not written by ``torch.save``, or it holds code (a
            pickled global other than tensors and plain containers: refused, never run; the
            message does not suggest turning ``weights_only`` off).
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        held = f"the Python object {found.group(1)}" if found else "Python objects other than tensors"
        raise UserError(
            f"{path}: refused: the {what} holds {held}, and loading it could run code; "
            f"a {what} for this tool holds tensors and plain values only"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, AttributeError) as err:
        reason = " ".join(str(err).split(".")[0].split())[:160] or type(err).__name__
        raise UserError(f"{path}: not a readable torch {what} (truncated, or not written by torch.save): {reason}") from None
