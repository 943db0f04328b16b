"""Score request batches with a package written by :mod:`torchrec_hstu.export`.

Needs only the ``.pt2`` package, the signature JSON beside it and this library's custom ops
(imported from the modules the signature lists, e.g. the FP8 attention op): no config, no
checkpoint, no model class.

Request files hold batches, each a mapping from the signature's input names to flat integer
lists (symbols: ``B`` requests, ``K`` channels)::

    # retrieval: every request has >= 1 history item
    {"item_ids": [3, 7, 1, 9, 4], "lengths": [2, 3], "timestamps": [60, 120, 10, 20, 30]}
    # ranking: history_lengths is channel-major ([K * B]); candidates follow num_targets
    {"history_ids": [...], "history_lengths": [...], "history_timestamps": [...],
     "history_actions": [...], "candidate_ids": [...], "num_targets": [...],
     "candidate_timestamps": [...]}

Formats: ``.jsonl`` (one batch per line), ``.json`` (one batch or a list of batches), ``.pt``
(``torch.save`` of one ``{name: int tensor}`` dict or a list of them; loaded with
``weights_only=True``).

Output (JSON lines, one per batch): ranking ``{"batch": i, "task_names": [...], "scores":
[[[logit per task] per candidate] per request]}``; retrieval ``{"batch": i, "items": [[top-k
ids] per request], "scores": [[their scores] per request]}`` (``--top-k 0``: all scores, no
ids).

CLI::

    python -m torchrec_hstu.predict --package model.pt2 --input requests.jsonl [--output out.jsonl]

Timestamps are seconds, ``0 <= t <= 2^63 - 1``, non-decreasing within each history (a request's
history in retrieval, a (channel, request) history in ranking); anything else is refused, so
no difference of two timestamps overflows int64.

Before the package is loaded its sha256 is checked against the signature (a ``.pt2`` and a
``.json`` from different exports, a truncated or changed package are refused); after loading,
the model sizes stored in the package must equal the signature's.

Bad inputs (missing file, wrong dtype, lengths not summing to the values, a sequence longer
than the exported bound, ids out of range, timestamps out of order, ...) print
``error: <file>: batch <i>: <what>`` and exit with status 2 (``--debug``: the traceback).
"""

import argparse
import importlib
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from torchrec_hstu.cli import UserError, add_debug_flag, load_torch_file, run_cli
from torchrec_hstu.export.signature import RANKING, RETRIEVAL, ModelSignature, signature_path_for

__all__ = ["Predictor", "check_batch", "main", "read_batches", "format_output"]

BatchLike = Mapping[str, Union[torch.Tensor, Sequence[int]]]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_int64(name: str, value: Any) -> torch.Tensor:
    """A 1-D int64 tensor from an integer tensor or a flat list of ints; ``ValueError`` else."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"{name} must be an integer tensor (int64 or int32); got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(value.shape)}")
        return value.to(torch.int64)
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                kind = "a nested list" if isinstance(item, (list, tuple)) else type(item).__name__
                raise ValueError(
                    f"{name} must be a flat list of integers (int64); element {index} is {kind} ({item!r})"
                )
            if not _INT64_MIN <= item <= _INT64_MAX:
                raise ValueError(
                    f"{name} must hold int64 values (-2^63 .. 2^63-1); element {index} is {item}"
                )
        return torch.tensor(list(value), dtype=torch.int64)
    raise ValueError(f"{name} must be a list of integers or an integer tensor; got {type(value).__name__}")


def _check_sum(lengths_name: str, lengths: torch.Tensor, values_name: str, values: torch.Tensor) -> None:
    if int(lengths.sum()) != values.numel():
        raise ValueError(
            f"{lengths_name} must sum to the number of {values_name} ({values.numel()}); "
            f"got sum({lengths_name}) = {int(lengths.sum())}"
        )


def _check_same_size(names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> None:
    sizes = {name: tensors[name].numel() for name in names}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{', '.join(names)} must have the same length; got {sizes}")


def _check_timestamps(name: str, timestamps: torch.Tensor, lengths: Optional[torch.Tensor] = None, what: str = "") -> None:
    """Timestamps >= 0 and, given ``lengths``, non-decreasing within each history (its segments)."""
    if timestamps.numel() and int(timestamps.min()) < 0:
        index = int(torch.nonzero(timestamps < 0)[0])
        raise ValueError(
            f"{name} must be seconds >= 0 (0 .. 2^63-1, so no difference overflows int64); "
            f"element {index} is {int(timestamps[index])}"
        )
    if lengths is None or timestamps.numel() < 2:
        return
    segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    backwards = (timestamps[1:] < timestamps[:-1]) & (segment[1:] == segment[:-1])
    if bool(backwards.any()):
        index = int(torch.nonzero(backwards)[0]) + 1
        raise ValueError(
            f"{name} must be non-decreasing within each {what} (oldest first); element {index} "
            f"({int(timestamps[index])}) is earlier than element {index - 1} ({int(timestamps[index - 1])}) "
            f"of {what} {int(segment[index])}"
        )


def check_batch(signature: ModelSignature, batch: BatchLike) -> List[torch.Tensor]:
    """Validate one batch against ``signature`` and return its inputs in order (int64, CPU).

    Args:
        signature: the package's signature.
        batch: ``{input name: flat int list or 1-D integer tensor}``.

    Returns:
        The program's positional inputs.

    Raises:
        ValueError: naming the input and the expected form (missing / unknown names, dtypes,
            sums, sizes, bounds, id ranges).
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a mapping of input names to lists; got {type(batch).__name__}")
    names = signature.input_names
    missing = [name for name in names if name not in batch]
    unknown = sorted(set(batch) - set(names))
    if missing or unknown:
        raise ValueError(f"batch inputs must be exactly {names}; missing {missing}, unknown {unknown}")
    t = {name: _as_int64(name, batch[name]) for name in names}
    bound, max_batch = signature.max_seq_len, signature.max_batch_size
    if signature.model_type == RETRIEVAL:
        lengths = t["lengths"]
        batch_size = lengths.numel()
        _check_same_size(["item_ids", "timestamps"], t)
        if batch_size < 1 or bool((lengths < 1).any()):
            raise ValueError(f"lengths must hold B >= 1 values, each >= 1 (retrieval needs a history); got {lengths.tolist()[:16]}")
        _check_sum("lengths", lengths, "item_ids", t["item_ids"])
        _check_timestamps("timestamps", t["timestamps"], lengths, "history")
        longest = int(lengths.max())
        ids = {"item_ids": t["item_ids"]}
    else:
        num_channels = len(signature.channels)
        num_targets = t["num_targets"]
        batch_size = num_targets.numel()
        history_lengths = t["history_lengths"]
        if batch_size < 1:
            raise ValueError("num_targets must hold B >= 1 values (one per request); got none")
        if history_lengths.numel() != num_channels * batch_size:
            raise ValueError(
                f"history_lengths must have K * B = {num_channels} * {batch_size} values (channel-major, "
                f"channels {signature.channels}); got {history_lengths.numel()}"
            )
        for name in ("history_lengths", "num_targets"):
            if bool((t[name] < 0).any()):
                raise ValueError(f"{name} must be >= 0; got {t[name].tolist()[:16]}")
        _check_same_size(["history_ids", "history_timestamps", "history_actions"], t)
        _check_same_size(["candidate_ids", "candidate_timestamps"], t)
        _check_sum("history_lengths", history_lengths, "history_ids", t["history_ids"])
        _check_sum("num_targets", num_targets, "candidate_ids", t["candidate_ids"])
        if t["candidate_ids"].numel() < 1:
            raise ValueError("the batch has no candidates (sum(num_targets) must be >= 1)")
        _check_timestamps("history_timestamps", t["history_timestamps"], history_lengths, "(channel, request) history")
        _check_timestamps("candidate_timestamps", t["candidate_timestamps"])
        if bool((t["history_actions"] < 0).any()):
            raise ValueError("history_actions must be >= 0 (action bitmasks)")
        per_channel = history_lengths.view(num_channels, batch_size) + num_targets.unsqueeze(0)
        longest = int(per_channel.max())
        ids = {"history_ids": t["history_ids"], "candidate_ids": t["candidate_ids"]}
    if batch_size > max_batch:
        raise ValueError(f"the batch has {batch_size} requests; the package accepts at most {max_batch} (split it)")
    if longest > bound:
        what = "history length" if signature.model_type == RETRIEVAL else "history + candidates of a channel"
        raise ValueError(
            f"a request's {what} is {longest} tokens, longer than the exported bound max_seq_len={bound}; "
            "truncate the history or re-export with a larger --max-seq-len"
        )
    for name, values in ids.items():
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= signature.num_items):
            raise ValueError(
                f"{name} must be in [0, {signature.num_items}); got values in "
                f"[{int(values.min())}, {int(values.max())}]"
            )
    return [t[name] for name in names]


def read_batches(path: str) -> Iterator[Tuple[str, Any]]:
    """Yield ``(where, batch)`` from a request file (``where``: e.g. ``"file.jsonl:3"``).

    Raises:
        FileNotFoundError: missing file; ValueError: unreadable content or unknown extension.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".jsonl":
        with open(path, "r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        return
    if extension == ".json":
        with open(path, "r", encoding="utf-8") as handle:
            try:
                payload = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
    elif extension == ".pt":
        payload = load_torch_file(path, "request file")
    else:
        raise ValueError(f"{path}: unknown input format {extension!r}; use .jsonl, .json or .pt")
    batches = payload if isinstance(payload, list) else [payload]
    for index, batch in enumerate(batches):
        yield f"{path}[{index}]", batch


def format_output(
    signature: ModelSignature, inputs: Sequence[torch.Tensor], output: torch.Tensor, top_k: int = 10
) -> Dict[str, Any]:
    """The JSON record of one batch (without the ``"batch"`` index); see the module docstring."""
    output = output.detach().float().cpu()
    if signature.model_type == RANKING:
        num_targets = inputs[signature.input_names.index("num_targets")].tolist()
        per_request = torch.split(output, num_targets)
        return {"task_names": signature.task_names, "scores": [part.tolist() for part in per_request]}
    if top_k <= 0:
        return {"scores": output.tolist()}
    values, items = torch.topk(output, min(top_k, output.shape[1]), dim=1)
    return {"items": items.tolist(), "scores": values.tolist()}


class Predictor:
    """A loaded package: validates batches and runs them.

    Args:
        package_path: the ``.pt2``.
        signature_path: the JSON (default: beside the package, same name).

    Example::

        >>> predictor = Predictor("model.pt2")  # doctest: +SKIP
        >>> logits = predictor({"history_ids": [...], ...})  # doctest: +SKIP
    """

    def __init__(self, package_path: str, signature_path: Optional[str] = None) -> None:
        if not os.path.isfile(package_path):
            raise FileNotFoundError(f"package not found: {package_path}")
        self.package_path = package_path
        self.signature = ModelSignature.load(signature_path or signature_path_for(package_path))
        self.signature.check_package(package_path)
        if self.signature.device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{package_path} was compiled for CUDA but CUDA is not available here")
        for module in self.signature.op_modules:
            importlib.import_module(module)
        self.device = torch.device(self.signature.device)
        try:
            self.runner = torch._inductor.aoti_load_package(package_path)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            reason = " ".join(str(err).split())[:200]
            raise UserError(f"{package_path}: cannot load the AOTInductor package ({reason})") from err
        self.signature.check_package_sizes(package_path, self.runner.get_metadata())

    def run(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run already-validated positional inputs (see :func:`check_batch`).

        Raises:
            RuntimeError: the output's shape is not the signature's (a package fault).
        """
        with torch.inference_mode():
            output = self.runner(*[x.to(self.device) for x in inputs])
        if isinstance(output, (list, tuple)):
            (output,) = output
        signature = self.signature
        if signature.model_type == RETRIEVAL:
            expected = (inputs[signature.input_names.index("lengths")].numel(), signature.num_items)
        else:
            expected = (inputs[signature.input_names.index("candidate_ids")].numel(), len(signature.task_names))
        if tuple(output.shape) != expected:
            raise RuntimeError(
                f"{self.package_path} returned {signature.output_name} of shape {list(output.shape)}; its signature "
                f"says {list(expected)}"
            )
        return output

    def __call__(self, batch: BatchLike) -> torch.Tensor:
        """Validate ``batch`` and return the package output (``scores`` / ``logits``)."""
        return self.run(check_batch(self.signature, batch))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m torchrec_hstu.predict``."""
    parser = argparse.ArgumentParser(
        prog="python -m torchrec_hstu.predict",
        description="Score request batches with an AOTInductor package from torchrec_hstu.export.",
    )
    parser.add_argument("--package", required=True, help="the .pt2 package (its .json signature beside it)")
    parser.add_argument("--input", required=True, help="request batches: .jsonl, .json or .pt")
    parser.add_argument("--output", default=None, help="write JSON lines here (default: print)")
    parser.add_argument("--top-k", type=int, default=10, help="retrieval: items per request (0: all scores)")
    add_debug_flag(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Score the batches as the arguments say; returns 0.

    Raises:
        ValueError / FileNotFoundError: a user error; :func:`torchrec_hstu.cli.run_cli` prints it
            as one line ``error: ...`` and exits 2.
    """
    args = build_parser().parse_args(argv)
    predictor = Predictor(args.package)
    records: List[str] = []
    for index, (where, batch) in enumerate(read_batches(args.input)):
        try:
            inputs = check_batch(predictor.signature, batch)
        except ValueError as err:
            raise UserError(f"{where}: batch {index}: {err}") from err
        output = predictor.run(inputs)
        record = {"batch": index, **format_output(predictor.signature, inputs, output, args.top_k)}
        records.append(json.dumps(record))
    text = "\n".join(records) + ("\n" if records else "")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"wrote {len(records)} batches to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_cli(main)
