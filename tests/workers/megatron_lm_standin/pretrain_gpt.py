"""The stand-in's training script: parses Megatron's arguments and reports them, then stops where Megatron-LM stops
on a machine without a GPU. (Megatron-LM's own initialize_megatron asserts CUDA before parsing; the stand-in parses
first so that a test can see what arrived.)"""

import json
import os

import torch
from megatron.training.arguments import parse_args

args = parse_args()
hook = "megatron_adamc.autoload" in __import__("sys").modules
report = {k: getattr(args, k, None) for k in ("adamc", "adamc_exclude", "data_path", "save", "lr")}
print("STANDIN_ARGS " + json.dumps({"rank": os.environ.get("RANK"), "hook": hook, **report}), flush=True)
assert torch.cuda.is_available(), "Megatron requires CUDA."
