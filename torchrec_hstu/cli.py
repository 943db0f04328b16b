"""One way for every command-line entry point to end on a user error.

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
"""

import argparse
import os
import sys
import traceback
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple, Type

__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "EXIT_USER_ERROR",
    "USER_ERRORS",
    "UserError",
    "add_debug_flag",
    "error_line",
    "run_cli",
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
