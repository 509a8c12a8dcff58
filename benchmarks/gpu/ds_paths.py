"""Step 4, DeepSpeed's stepping paths that only a GPU shows: ZeRO-3 partial optimizer offload (the GPU-resident
sub-groups step through a second, torch AdamW optimizer) and fp16 dynamic loss scaling (overflowed steps skipped).

Their script comes from the DeepSpeed-paths work (issue 13). Contract: ``python SCRIPT --out FILE`` exits 0 when
every path applied the corrected decay, and may write a JSON object of its figures to FILE; this step runs it when
it is in the tree and records "not available" otherwise. On the CPU these paths do not exist (the offload split
never puts a sub-group on the GPU), so the step is skipped there.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gpu.common import REPO, StepContext, child_env, run_logged

SCRIPT = REPO / "tests" / "workers" / "ds_paths_gpu.py"


def run(ctx: StepContext) -> bool | None:
    if ctx.cpu:
        ctx.save(skipped="needs a GPU: partial offload and fp16 overflow skips take other paths on a CPU")
        return None
    if not SCRIPT.is_file():
        ctx.save(skipped=f"not available: {SCRIPT.relative_to(REPO)} is not in this tree yet (issue 13)")
        return None
    out = ctx.work / "ds_paths.json"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)]
    finished = run_logged(cmd, ctx.work / "ds_paths_gpu.log", ctx.left(), env=child_env(False))
    figures: dict[str, Any] = {"script": str(SCRIPT.relative_to(REPO)), "returncode": finished.returncode}
    if out.is_file():
        try:
            figures["results"] = json.loads(out.read_text())
        except json.JSONDecodeError as err:
            figures["results_error"] = f"{out.name} is not JSON: {err}"
    if finished.killed or finished.returncode != 0:
        figures["error"] = f"{finished.killed or f'exit code {finished.returncode}'}: {finished.last_line()}"
        print(finished.tail(40), flush=True)
    ctx.save(**figures)
    return "error" not in figures


def summary(record: dict[str, Any]) -> str:
    results = record.get("results")
    if isinstance(results, dict):
        return ", ".join(f"{k}: {v}" for k, v in list(results.items())[:6])[:300]
    return ""


def markdown(record: dict[str, Any]) -> str:
    results = record.get("results")
    return f"```json\n{json.dumps(results, indent=1)[:4000]}\n```" if results else ""
