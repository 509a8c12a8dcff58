import argparse


def add_megatron_arguments(parser):
    for flag, kind, default in (
        ("--lr", float, None),
        ("--min-lr", float, 0.0),
        ("--weight-decay", float, 0.01),
        ("--lr-warmup-init", float, 0.0),
        ("--lr-warmup-iters", int, 0),
        ("--lr-warmup-samples", int, 0),
        ("--lr-warmup-fraction", float, None),
        ("--lr-decay-style", str, "linear"),
        ("--decoupled-lr", float, None),
        ("--decoupled-min-lr", float, None),
        ("--train-iters", int, None),
        ("--global-batch-size", int, 1),
        ("--data-path", str, None),
        ("--save", str, None),
        ("--load", str, None),
        ("--tensorboard-dir", str, None),
    ):
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--optimizer-cuda-graph", action="store_true")  # megatron-core 0.18+
    parser.add_argument("--exit-signal-handler", action="store_true")
    return parser


def parse_args(extra_args_provider=None, ignore_unknown_args=False):
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser = add_megatron_arguments(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser.parse_known_args()[0] if ignore_unknown_args else parser.parse_args()
