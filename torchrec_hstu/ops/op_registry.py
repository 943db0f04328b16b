"""Which Python module registers each of this package's custom ops.

A module that defines a custom op records itself as it registers the op, so an exported
program's loader knows what to import before loading (``torchrec_hstu.predict`` imports the
modules a package's signature lists). A leaf: it imports nothing of this package.

Example::

    >>> record_op_module("torchrec_hstu::example_op", "torchrec_hstu.ops.example")
    >>> op_module("torchrec_hstu::example_op")
    'torchrec_hstu.ops.example'
"""

from typing import Dict, Optional

__all__ = ["op_module", "op_modules", "record_op_module"]

_OP_MODULES: Dict[str, str] = {}


def record_op_module(qualname: str, module: str) -> None:
    """Record that importing ``module`` registers the op ``qualname``.

    Args:
        qualname: ``"namespace::name"`` of the op.
        module: the importable module name (a defining module passes ``__name__``).

    Raises:
        ValueError: a malformed name, or the op already recorded for another module.
    """
    if "::" not in qualname or not module:
        raise ValueError(f"qualname must be 'namespace::name' and module non-empty; got {qualname!r}, {module!r}")
    known = _OP_MODULES.setdefault(qualname, module)
    if known != module:
        raise ValueError(f"op {qualname} is already recorded for module {known}; got {module}")


def op_module(qualname: str) -> Optional[str]:
    """The module recorded for ``qualname`` (None if it did not record itself)."""
    return _OP_MODULES.get(qualname)


def op_modules() -> Dict[str, str]:
    """A copy of ``{op qualname: module}`` for every op recorded so far."""
    return dict(_OP_MODULES)
