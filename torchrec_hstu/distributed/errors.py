"""Complete error records for torchrun: each rank's error file is written, then renamed.

torchrun (``torch.distributed.elastic``) gives every worker an error file
(``$TORCHELASTIC_ERROR_FILE``); the worker's ``@record`` decorator writes the exception there as
JSON, and torchrun reads it for its failure summary when the worker exits. torch's handler
writes the file in place, so a rank killed while writing (torchrun stops the surviving ranks
as soon as one fails) leaves a half-written JSON, and torchrun's summary then dies parsing it
(seen once in two runs). :class:`AtomicErrorHandler` writes to a temporary file in the same
folder and renames it over the error file: torchrun reads a complete record or none.

Example::

    from torchrec_hstu.distributed.errors import record_errors

    @record_errors
    def main(argv=None): ...
"""

import json
import time
import traceback
from typing import Any, Callable, TypeVar

from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

from torchrec_hstu.cli import write_atomic

__all__ = ["AtomicErrorHandler", "record_errors"]

F = TypeVar("F", bound=Callable[..., Any])


class AtomicErrorHandler(ErrorHandler):
    """torch's :class:`ErrorHandler` with every error file written by
    :func:`torchrec_hstu.cli.write_atomic`.

    The record has torch's layout (``{"message": {"message", "extraInfo": {"py_callstack",
    "timestamp"}}}``), which torchrun's summary parses.
    """

    def _write_error_file(self, file_path: str, error_msg: str) -> None:
        write_atomic(file_path, error_msg)

    def record_exception(self, e: BaseException) -> None:
        file = self._get_error_file_path()
        if not file:
            return
        data = {
            "message": {
                "message": f"{type(e).__name__}: {e}",
                "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))},
            }
        }
        write_atomic(file, json.dumps(data))


def record_errors(fn: F) -> F:
    """``torch.distributed.elastic``'s ``@record`` with :class:`AtomicErrorHandler`."""
    return record(fn, error_handler=AtomicErrorHandler())  # type: ignore[return-value]
