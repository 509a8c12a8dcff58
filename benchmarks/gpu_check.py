"""The GPU proof in one command: each step in its own process with its own time budget; a failed step records why.

Steps (benchmarks/gpu/, one file each): parity (DeepSpeed FusedAdam built, AdamC vs hand-decayed AdamW on ZeRO 0-3,
fp32 and bf16, step cost at 1B), throughput (125M and 1B, bf16, seq 2048: tokens/s, MFU, peak memory vs the
planner; compile and activation checkpointing), tracking (overhead every step and every 10 steps vs off), ds_paths
(DeepSpeed's GPU-only stepping paths, when their script is in the tree), megatron (Megatron-LM's pretrain_gpt through
the plugin: logged decay vs the formula, step time vs --no-adamc), curves (with the time left: AdamW vs AdamC on 125M).

On the device machine: ``bash benchmarks/gpu_check.sh`` (installs the carried wheels, then runs this; docs/gpu.md).
Here: ``python benchmarks/gpu_check.py --cpu --out DIR [--quick]``, the same steps at tiny sizes.
DIR gets gpu_check.json (device, steps: name, ok, seconds, figures), gpu_check.md, gpu_check.log and curves.png,
rewritten after every step, so a command killed at its limit still leaves what was measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu/ steps and optimizer_step.py, also under -m

from gpu.common import StepContext, child_env, remove_stale_build_locks, run_logged, table, write_json  # noqa: E402
from gpu.trainer_runs import data_settings  # noqa: E402


@dataclass(frozen=True)
class Step:
    name: str
    gpu_s: float | None  # time budget on one H200 (None: whatever is left)
    cpu_s: float | None  # time budget on this 2-core CPU (--quick runs fewer cases within the same caps)
    needs: tuple[str, ...] = ()  # background jobs (BACKGROUND) to wait for first
    required: bool = True  # later-step reserve: an optional step runs only with time left


# CPU caps are loose: on an idle machine the full CPU check takes ~5 minutes, the quick one ~1.5; a loaded shared
# machine runs several times slower and should not turn into failures.
STEPS = [
    Step("parity", 110, 240),
    Step("throughput", 150, 240, needs=("data",)),
    Step("tracking", 60, 150, needs=("data",)),
    Step("ds_paths", 60, 30, needs=("cpu_adam",)),
    Step("megatron", 100, 120),  # the FP32-main-param proof (~45 s) and an unmodified pretrain_gpt.py (~45 s)
    Step("curves", None, None, needs=("data",), required=False),
]
RESERVE_S = 15  # kept per later required step, so a slow step cannot starve all that follow
MIN_STEP_S = 20  # a step with less than this left is recorded as skipped for time
GRACE_S = 8  # a step's own deadline falls this long before it is killed: it stops sub-runs and saves
TOTAL_S = {"gpu": 480, "cpu": 900, "quick": 900}


def device_info(cpu: bool) -> dict[str, Any]:
    """What ran the check: the GPU (name, memory, driver, CUDA, nvcc) or the CPU, and the package versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
    }
    for package in ("deepspeed", "megatron-core", "pydantic", "transformers"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if not cpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1))
        info["capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["nvcc"] = _command_line(["nvcc", "--version"])
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "CPU")
        info["name"] = f"{model} ({os.cpu_count()} cores, no GPU)"
    return info


def describe_device(cpu: bool) -> dict[str, Any]:
    """``device_info`` in a child process: a CUDA context held by this process all along would take GPU memory from
    every step and show in their nvidia-smi readings."""
    flags = ["--device-info"] + (["--cpu"] if cpu else [])
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags], capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"name": "unknown", "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def _command_line(cmd: list[str]) -> str | None:
    """The last line a tool prints (nvcc's version, the driver), or None where the tool is missing."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[-1].strip() if out else None


def step_module(name: str):
    return importlib.import_module(f"gpu.{name}")


def background_code(job: str, args: argparse.Namespace) -> str | None:
    """Work that starts at once, beside parity (which mostly waits on nvcc and the GPU), for the steps that need it:
    the default corpus and its tokenizer (CPU), and on a GPU DeepSpeed's CPUAdam build (ds_paths' partial offload)."""
    if job == "data":
        data = data_settings(args.cpu)
        return (
            "from megatron_adamc.data import prepare_default_data; "
            f"prepare_default_data({str(args.data_cache)!r}, {data['vocab_size']}, {data['max_bytes']}, "
            f"workers={1 if args.cpu else 8}, progress=False)"
        )
    if job == "cpu_adam" and not args.cpu:  # on the CPU it is built by the set-up, and ds_paths does not run
        return "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('CPUAdamBuilder').load()"
    return None


def start_background(args: argparse.Namespace, work: Path, selected: list[Step]) -> dict[str, subprocess.Popen]:
    jobs = {}
    for job in sorted({job for step in selected for job in step.needs}):
        code = background_code(job, args)
        if code is not None:
            log = (work / f"{job}.log").open("w")
            cmd = [sys.executable, "-c", code]
            jobs[job] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(args.cpu))
    return jobs


def run_step(step: Step, args: argparse.Namespace, work: Path, timeout: float, earlier: dict) -> dict[str, Any]:
    """One step in its own process: its record, with ok/seconds added, and the error where it failed or hung."""
    ctx = StepContext(
        name=step.name, cpu=args.cpu, quick=args.quick, out=args.out, work=work / step.name,
        deadline=time.time() + timeout - GRACE_S, data_cache=args.data_cache, earlier=earlier,
    )  # fmt: skip
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.record_path.unlink(missing_ok=True)
    context_file = ctx.work / "context.json"
    ctx.dump(context_file)
    finished = run_logged(
        [sys.executable, str(Path(__file__).resolve()), "--worker", step.name, "--context", str(context_file)],
        work / f"{step.name}.log",
        timeout,
        env=child_env(args.cpu),
        poll_s=1.0,
    )
    record = json.loads(ctx.record_path.read_text()) if ctx.record_path.is_file() else {}
    entry: dict[str, Any] = {"name": step.name, "ok": record.pop("ok", False), "seconds": round(finished.seconds, 1)}
    entry["budget_s"] = round(timeout)
    entry.update(record)
    if finished.killed:
        entry["ok"] = False
        entry["error"] = f"{finished.killed} (its budget); figures so far are kept"
    elif finished.returncode != 0 and "error" not in entry:
        entry["ok"] = False
        entry["error"] = f"exit code {finished.returncode}: {finished.last_line()}"
    return entry


def worker(name: str, context_file: Path) -> int:
    """The step process: runs ``gpu.<name>.run`` and saves ok (True, False, or None when skipped) and any error."""
    ctx = StepContext.load(context_file)
    try:
        ok = step_module(name).run(ctx)
    except Exception as err:  # noqa: BLE001 - the check goes on; the record says what broke
        traceback.print_exc()
        lines = str(err).strip().splitlines()
        ctx.save(ok=False, error=f"{type(err).__name__}: {lines[-1] if lines else ''}"[:600])
        return 1
    ctx.save(ok=ok)
    return 0


def write_outputs(out: Path, device: dict, steps: list[dict], total_s: float, argv: list[str]) -> None:
    report = {"device": device, "command": "python benchmarks/gpu_check.py " + " ".join(argv), "steps": steps}
    report["seconds"] = round(total_s, 1)
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(device, steps, total_s))


def status(entry: dict) -> str:
    if entry["ok"] is None:
        return "skipped"
    return "ok" if entry["ok"] else "FAILED"


def markdown(device: dict, steps: list[dict], total_s: float) -> str:
    title = f"# GPU check: {device.get('name')}, {device.get('date')}\n\n"
    names = ("torch", "cuda", "deepspeed", "megatron-core")
    versions = ", ".join(f"{k} {device[k]}" for k in names if device.get(k))
    lines = [title + f"{versions}; {total_s:.0f} s in all.\n"]
    rows = []
    for entry in steps:
        why = entry.get("error") or entry.get("skipped") or ""
        rows.append([entry["name"], status(entry), entry["seconds"], _step_summary(entry), why[:200]])
    lines.append(table(["step", "result", "seconds", "figures", "error / why skipped"], rows))
    for entry in steps:
        detail = _step_markdown(entry)
        if detail:
            lines.append(f"\n## {entry['name']}\n\n{detail}")
    return "\n".join(lines) + "\n"


def _step_summary(entry: dict) -> str:
    try:
        return step_module(entry["name"]).summary(entry)
    except Exception as err:  # noqa: BLE001 - a partial record must not stop the report
        return f"(no summary: {type(err).__name__})"


def _step_markdown(entry: dict) -> str:
    try:
        return step_module(entry["name"]).markdown(entry)
    except Exception:  # noqa: BLE001
        return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="results: json, md, log, png")
    parser.add_argument("--cpu", action="store_true", help="the same steps at tiny sizes, on this CPU")
    parser.add_argument("--quick", action="store_true", help="with --cpu: the fewest cases and runs (the test suite)")
    parser.add_argument("--only", default=None, help="comma-separated steps, e.g. parity,megatron (a second try)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (GPU 450, CPU 900)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument("--data-cache", type=Path, default=None, help="default-corpus cache (default: in --work)")
    parser.add_argument("--device-info", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS]
    args.steps = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in args.steps if n not in names]
    if unknown:
        parser.error(f"--only {args.only}: unknown step {unknown[0]!r}; the steps are {', '.join(names)}")
    if args.quick and not args.cpu:
        parser.error("--quick is for the CPU run (--cpu --quick); on a GPU, --only picks steps")
    if args.budget_s is not None and args.budget_s < MIN_STEP_S:
        parser.error(f"--budget-s must be >= {MIN_STEP_S}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.context)
    if args.device_info:
        print(json.dumps(device_info(args.cpu)))
        return 0
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run with --cpu for the CPU version", file=sys.stderr)
        return 2
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    args.data_cache = args.data_cache or work / "corpus"
    budget = args.budget_s or TOTAL_S["quick" if args.quick else "cpu" if args.cpu else "gpu"]
    device = describe_device(args.cpu)
    print(f"gpu_check: {device['name']}; steps {', '.join(args.steps)}; {budget:.0f} s; work in {work}", flush=True)
    selected = [s for s in STEPS if s.name in args.steps]
    jobs = start_background(args, work, selected)
    log = (args.out / "gpu_check.log").open("w")
    results: list[dict[str, Any]] = []
    for index, step in enumerate(selected):
        for job in step.needs:  # before the budget is worked out: the wait is the check's time, not the step's
            if job in jobs and jobs[job].poll() is None:
                try:
                    jobs[job].wait(timeout=max(1.0, start + budget - time.time() - MIN_STEP_S))
                except subprocess.TimeoutExpired:
                    jobs[job].kill()  # the step's own runs do that work then, within its budget
                    jobs[job].wait()
        left = start + budget - time.time()
        reserve = RESERVE_S * sum(s.required for s in selected[index + 1 :])
        own = step.cpu_s if args.cpu else step.gpu_s
        timeout = min(own or float("inf"), left - reserve)
        if timeout < MIN_STEP_S:
            entry = {"name": step.name, "ok": None, "seconds": 0.0, "skipped": f"out of time ({left:.0f} s left)"}
        else:
            entry = run_step(step, args, work, timeout, {r["name"]: r for r in results})
        results.append(entry)
        step_log = work / f"{step.name}.log"
        log.write(f"\n===== {step.name}: {status(entry)} in {entry['seconds']} s\n")
        log.write(step_log.read_text(errors="replace") if step_log.is_file() else "(no log)\n")
        log.flush()
        why = entry.get("error") or entry.get("skipped") or ""
        line = f"[{step.name}] {status(entry)} in {entry['seconds']} s: {_step_summary(entry)} {why}"
        print(line.rstrip(), flush=True)
        write_outputs(args.out, device, results, time.time() - start, argv)
    for job in jobs.values():
        if job.poll() is None:  # e.g. a CPUAdam build no step needed in the end: its lock must not outlive it
            job.kill()
            job.wait()
            remove_stale_build_locks(start)
    log.close()
    print("\n" + (args.out / "gpu_check.md").read_text(), flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(entry["ok"] is False for entry in results) else 0


if __name__ == "__main__":
    sys.exit(main())
