"""The export CLI: config + checkpoint -> ``model.pt2`` + ``model.json``.

Usage::

    python -m torchrec_hstu.export --config X.pbtxt --checkpoint ckpt.pt --out model.pt2

A user error (missing or unreadable file, a checkpoint that does not fit the config, an
option combination that cannot compile) ends with one line ``error: ...`` and exit status 2
(:func:`torchrec_hstu.cli.run_cli`); ``--debug`` shows the traceback.
"""

import argparse
import logging
import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from torchrec_hstu.cli import UserError, add_debug_flag

if TYPE_CHECKING:
    from torchrec_hstu.config import hstu_pb2

__all__ = ["build_parser", "main"]

#: ``--mixed-precision`` values -> autocast dtypes.
MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m torchrec_hstu.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_hstu.export",
        description="Export an HSTU model (config + checkpoint) to an AOTInductor .pt2 package "
        "with a JSON input signature beside it.",
    )
    parser.add_argument("--config", required=True, help="text-format HSTUModel config (.pbtxt)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint (state dict or {'model': state dict})")
    parser.add_argument("--out", required=True, help="package path, ending in .pt2")
    parser.add_argument("--max-batch-size", type=int, default=64, help="largest batch (default 64)")
    parser.add_argument(
        "--max-seq-len", type=int, default=None,
        help="bound on a sequence (history + candidates); default the config's max_seq_len",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="device the package runs on (cuda needs --mixed-precision)",
    )
    parser.add_argument("--kernel", default=None, help="override the config's attention kernel")
    parser.add_argument(
        "--fp8-quant-mode", type=int, default=None, help="set every channel's fp8_quant_mode (-1..5)"
    )
    parser.add_argument(
        "--mixed-precision", choices=("bf16", "fp16"), default=None,
        help="trace under torch.autocast with this dtype (weights stay float32); required with --device cuda",
    )
    parser.add_argument(
        "--fast-compile", action="store_true",
        help="build the C++ at -O0 (aot_inductor.debug_compile): faster compile, slower package",
    )
    add_debug_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export as the arguments say; returns 0.

    Raises:
        UserError / ValueError / FileNotFoundError: a user error (``run_cli`` prints it as one
            line and exits 2).
    """
    from torchrec_hstu.config import load_config
    from torchrec_hstu.export.exporter import check_export_options, export_model
    from torchrec_hstu.models.build import build_model_from_config, load_checkpoint_state

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    autocast_dtype = MIXED_PRECISION[args.mixed_precision]
    check_export_options(args.device, autocast_dtype)
    if not args.out.endswith(".pt2"):
        raise UserError(f"--out must be a path ending in .pt2; got {args.out!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config not found: {args.config}")
    with open(args.config, "r", encoding="utf-8") as handle:
        config_text = handle.read()
    config: "hstu_pb2.HSTUModel" = load_config(args.config)
    state = load_checkpoint_state(args.checkpoint)
    try:
        model = build_model_from_config(config, state, kernel=args.kernel, fp8_quant_mode=args.fp8_quant_mode)
    except UserError as err:
        raise UserError(f"--checkpoint {args.checkpoint} does not fit --config {args.config}: {err}") from err
    model = model.to(args.device)
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else (int(config.max_seq_len) or None)
    if max_seq_len is None:
        raise UserError("the config has no max_seq_len; pass --max-seq-len")
    inductor_configs = {"aot_inductor.debug_compile": True} if args.fast_compile else None
    result = export_model(
        model, args.out, args.max_batch_size, max_seq_len, config_text, inductor_configs, autocast_dtype
    )
    sig = result.signature
    print(
        f"wrote {result.package_path} and {result.signature_path}: {sig.model_type}, inputs "
        f"{sig.input_names}, dims {sig.dims}, FP8 modes {sig.fp8_quant_modes}, export "
        f"{sig.export_seconds:.1f} s, AOTInductor {sig.compile_seconds:.1f} s"
    )
    return 0
