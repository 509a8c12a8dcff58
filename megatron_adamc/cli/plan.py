"""``megatron-adamc plan --config FILE --nodes N --gpus-per-node G --gpu-memory-gb M [--set k=v] [--json]``.

Exit 0 when the run fits, 1 when it does not (one line on stderr: the largest term and the fix), 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from megatron_adamc.plan.planner import H100_BF16_TFLOPS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="memory per GPU, fit and time to train of a config on given GPUs (no GPU needed)",
        description="Parameters, gradients, optimizer states (by ZeRO stage and offload), activations (by sequence "
        "length, micro batch and checkpointing) and buffers per GPU; tokens per step, FLOPs per token and time to "
        "train at a stated MFU. Exit 0: fits; 1: does not fit; 2: bad input. See docs/plan.md.",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/train/llama3_8b.yaml")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    parser.add_argument(
        "--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GiB (an H100 80GB: 80)"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_TFLOPS,
        help=f"dense peak TFLOP/s of one GPU (default {H100_BF16_TFLOPS:g}: H100/H200 bf16)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in docs/plan.md)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron_adamc.config.train import load_config
    from megatron_adamc.plan import Hardware, format_plan, not_fit_line, plan_json, plan_run

    hardware = Hardware(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.peak_tflops, args.mfu)
    # DeepSpeed (imported to check the JSON's keys) logs to stdout: keep stdout for the plan alone.
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_run(load_config(args.config, args.overrides), hardware)
    if args.json:
        print(json.dumps(plan_json(plan, args.config), indent=2))
    else:
        print(format_plan(plan, args.config))
    if not plan.fits:
        print(f"megatron-adamc plan: {not_fit_line(plan)}", file=sys.stderr, flush=True)
        return 1
    return 0
