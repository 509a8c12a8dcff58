"""Step 4, DeepSpeed's stepping paths that only a GPU shows: ZeRO-3 partial optimizer offload (the GPU-resident
sub-groups step through a second, torch AdamW optimizer) and fp16 dynamic loss scaling (overflowed steps skipped).

Their script comes from the DeepSpeed-paths work (issue 13): ``python tests/workers/ds_paths_gpu.py --out FILE``
writes one JSON object, per path ``bitwise_equal`` / ``max_abs_diff`` (AdamC vs hand-decayed AdamW), ``decay_ok``,
``refused`` (a path AdamC refuses, with its one-line message) or ``error``. This step runs it when it is in the tree
("not available" otherwise) and passes when it exits 0 and no path differs, misses the decay or errs. CPUAdam (for
the offload paths) is built in the background while parity runs. On the CPU these paths do not exist (the offload
split never puts a sub-group on the GPU), so the step is skipped there.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gpu.common import REPO, StepContext, child_env, run_logged, table

SCRIPT = REPO / "tests" / "workers" / "ds_paths_gpu.py"


def run(ctx: StepContext) -> bool | None:
    if ctx.cpu:
        ctx.save(skipped="needs a GPU: partial offload and fp16 overflow skips take other paths on a CPU")
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
    figures["verdicts"] = verdicts(figures.get("results"))
    ctx.save(**figures)
    bad = [name for name, verdict in figures["verdicts"].items() if verdict in ("differs", "not refused", "error")]
    return "error" not in figures and bool(figures["verdicts"]) and not bad


def verdicts(results: Any) -> dict[str, str]:
    """Per path: "equal" (bitwise or max_abs_diff 0, the decay right, the same steps taken as the reference),
    "refused" (AdamC stops with a message, as it should there), "not refused", "differs", or "error"."""
    out: dict[str, str] = {}
    for name, path in (results or {}).items() if isinstance(results, dict) else ():
        if not isinstance(path, dict):
            continue
        if "error" in path:
            out[name] = "error"
        elif "refused" in path:
            out[name] = "refused" if path["refused"] else "not refused"
        elif "bitwise_equal" in path or "max_abs_diff" in path or "decay_ok" in path:
            equal = path.get("bitwise_equal") is True or path.get("max_abs_diff") == 0
            same = path.get("decay_ok", True) is True and path.get("same_taken_as_reference", True) is True
            out[name] = "equal" if equal and same else "differs"
        else:
            out[name] = "reported"  # a figure of another kind (e.g. the backup optimizer's lr): in the JSON
    return out


def summary(record: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for verdict in record.get("verdicts", {}).values():
        counts[verdict] = counts.get(verdict, 0) + 1
    return ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))


def markdown(record: dict[str, Any]) -> str:
    rows = [[name, verdict] for name, verdict in record.get("verdicts", {}).items()]
    text = table(["path", "verdict"], rows) if rows else ""
    results = record.get("results")
    return text + (f"\n\n```json\n{json.dumps(results, indent=1)[:4000]}\n```" if results else "")
