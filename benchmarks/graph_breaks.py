"""Where ``torch.compile`` breaks the graph of an ``STUStack`` forward (issue 17: compiling the
dense parts around the attention ops only pays if the stack is one graph).

Prints ``torch._dynamo.explain``'s graph and break counts and, per break, its reason and the
last frames of our code. Usage::

    python benchmarks/graph_breaks.py --device cuda --kernel TRITON
    .venv/bin/python benchmarks/graph_breaks.py --device cpu --kernel PYTORCH   # CPU dry run
"""

import argparse
import os
import sys
from typing import List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from torchrec_hstu.modules import STUStack  # noqa: E402
from torchrec_hstu.ops.common import check_jagged_batch_sync  # noqa: E402
from torchrec_hstu.ops.jagged import lengths_to_offsets  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernel", default="TRITON")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--targets", action="store_true", help="pass num_targets")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dim, heads = 64, 2
    stu = dict(embedding_dim=dim, num_heads=heads, hidden_dim=32, attention_dim=32, output_dropout_ratio=0.0)
    stack = STUStack.uniform(stu, args.layers, kernel=args.kernel).to(device)
    lengths = torch.tensor([5, 9, 3])
    offsets = lengths_to_offsets(lengths).to(device)
    num_targets = torch.tensor([1, 2, 1], device=device) if args.targets else None
    x = torch.randn(int(lengths.sum()), dim, device=device, requires_grad=True)
    facts = check_jagged_batch_sync(offsets, int(lengths.sum()), 9, num_targets)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return stack(x, offsets, 9, num_targets, batch_facts=facts).x

    explained = torch._dynamo.explain(forward)(x)
    print(f"graphs {explained.graph_count} breaks {explained.graph_break_count}")
    for reason in explained.break_reasons:
        print("BREAK:", reason.reason[:400])
        for frame in reason.user_stack[-5:]:
            print(f"    {frame.filename.replace(REPO + '/', '')}:{frame.lineno} {frame.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
