"""A demanding new user's bad inputs and faults against every command, each run as the user runs it (a fresh
``python -m megatron_adamc.cli ...`` process), counted: how many end in one line with the documented exit code and
the watched paths (run directory, data, outputs) byte-identical. Issue 22's closing count.

Usage: ``python benchmarks/user_errors_probe.py [--out docs/results/user_errors_probe.json] [-k SUBSTRING]``
(~130 processes; 10-30 min on a 2-core machine). A case "ends in one line" when stderr holds exactly one line
``megatron-adamc ...: error: ...`` (or ``...: interrupted``), no traceback, its exit code is the expected one, and
nothing watched changed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from user_errors import state_of  # noqa: E402 - the tests' own "byte-identical" (tests/user_errors.py)

CORPUS = Path(tempfile.gettempdir()) / "megatron-adamc-test-corpus"  # the tests' small corpus (built on demand)
CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"
SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
    "train.seq_len=64", "train.micro_batch_size=2", "scheduler.warmup_steps=2", "eval.batches=2",
    "checkpoint.interval=2", "tracking.interval=4", "logging.tensorboard=false", "logging.progress=false",
    "data.vocab_size=512", "data.max_bytes=400000", f"data.cache_dir={CORPUS}", "train.steps=4",
]  # fmt: skip


@dataclass
class Case:
    family: str
    command: str
    name: str
    argv: list[str]
    expect: tuple[int, ...]
    watch: list[Path] = field(default_factory=list)
    interrupt_after: float | None = None  # Ctrl-C this long after torch's library is loaded
    prefix: list[str] | None = None  # instead of [python, -m, megatron_adamc.cli]


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "megatron_adamc.cli", *argv]


def train(out: Path | str, *extra: str, config: Path | str = CONFIG) -> list[str]:
    return ["train", "--config", str(config), "--output-dir", str(out), *sets(*SMALL), *sets(*extra)]


def build(root: Path) -> list[Case]:
    """Every case, with the files it needs written under ``root``."""
    d = root
    run0 = d / "existing_run"
    run0.mkdir()
    (run0 / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    a_file = d / "a_file"
    a_file.write_text("x\n")
    cases: list[Case] = []

    def add(family: str, command: str, name: str, argv: list[str], expect=(2,), watch=None, **kw) -> None:
        cases.append(Case(family, command, name, [str(a) for a in argv], tuple(expect),
                          [run0, a_file] if watch is None else watch, **kw))  # fmt: skip

    def write(name: str, data: bytes | str) -> Path:
        path = d / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    # -- train: config values and files (family 5 and the rest)
    for name, items in [
        ("top-level typo", ["trian.steps=3"]), ("nested typo", ["train.stepz=3"]), ("seed -1", ["seed=-1"]),
        ("seed 2**32", ["seed=4294967296"]), ("steps 0", ["train.steps=0"]), ("lr -1", ["optimizer.lr=-1"]),
        ("lr nan", ["optimizer.lr=.nan"]), ("grad_clip inf", ["train.grad_clip=.inf"]),
        ("beta 1", ["optimizer.betas=[0.9, 1.0]"]), ("warmup >= steps", ["scheduler.warmup_steps=9"]),
        ("checkpointing some", ["train.activation_checkpointing=some"]), ("unknown preset", ["model.preset=huge"]),
        ("dim -1", ["model.dim=-1"]), ("seq_len > max", ["train.seq_len=100000"]),
        ("micro 0", ["train.micro_batch_size=0"]),
        ("--set no =", ["train.steps"]), ("--set yaml error", ["train.steps=[1,"]), ("--set empty part", ["a..b=1"]),
        ("scheduler foo", ["scheduler.type=foo"]), ("split abc", ["data.split=abc"]),
        ("eval.batches 0", ["eval.batches=0"]),
        ("wandb without wandb", ["logging.wandb=true"]), ("section as scalar", ["train=5"]),
    ]:  # fmt: skip
        add("5 config", "train", name, train(run0, *items))
    for name, data in [
        ("config binary", b"\x7fELF\x00\x01" * 20), ("config latin-1", "seed: 1 # caf\xe9\n".encode("latin-1")),
        ("config empty", b""), ("config comments only", b"# nothing\n"),
        ("config duplicate key", b"seed: 1\nseed: 2\n"),
        ("config yaml error", b"train: [1,\n"), ("config a list", b"- 1\n- 2\n"),
    ]:  # fmt: skip
        add("5 config", "train", name, train(run0, config=write(name.replace(" ", "_") + ".yaml", data)))
    add("5 config", "train", "config missing", train(run0, config=d / "nope.yaml"))
    add("5 config", "train", "config a folder", train(run0, config=d))

    # -- train: the DeepSpeed JSON (family 1)
    for name, text in [
        ("ds invalid json", "{"), ("ds top-level typo", '{"zero_optimisation": {"stage": 1}}'),
        ("ds stage 5", '{"zero_optimization": {"stage": 5}}'), ("ds stage -1", '{"zero_optimization": {"stage": -1}}'),
        ("ds stage one", '{"zero_optimization": {"stage": "one"}}'),
        ("ds zero typo", '{"zero_optimization": {"stage": 1, "overlap_com": true}}'),
        ("ds bf16 typo", '{"bf16": {"enable": true}}'), ("ds bf16 true", '{"bf16": true}'),
        ("ds zero 1", '{"zero_optimization": 1}'),
        ("ds offload gpu", '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}'),
        ("ds fp16 and bf16", '{"fp16": {"enabled": true}, "bf16": {"enabled": true}}'),
        ("ds fp16 on cpu", '{"fp16": {"enabled": true}}'),
        ("ds offload_param stage 2", '{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}'),
        ("ds optimizer section", '{"optimizer": {"type": "Adam"}}'),
        ("ds train_batch_size", '{"train_batch_size": 7}'),
        ("ds duplicate key", '{"bf16": {"enabled": true}, "bf16": {"enabled": false}}'),
        ("ds loss_scale -1", '{"fp16": {"enabled": true, "loss_scale": -1}}'), ("ds a list", "[1]"),
    ]:  # fmt: skip
        add(
            "1 deepspeed json",
            "train",
            name,
            train(run0, f"train.deepspeed={write(name.replace(' ', '_') + '.json', text)}"),
        )
    add("1 deepspeed json", "train", "ds missing", train(run0, f"train.deepspeed={d / 'nope.json'}"))

    # -- train: sizes (family 2)
    for name, items in [
        ("seq_len 1e9", ["train.seq_len=1000000000", "model.max_seq_len=1000000000"]),
        ("micro batch 1e5", ["train.micro_batch_size=100000"]), ("vocab 1e7", ["model.vocab_size=10000000"]),
        ("steps 1e9", ["train.steps=1000000000"]), ("eval.batches 1e6", ["eval.batches=1000000"]),
        ("a 70B model on this machine", ["model.dim=8192", "model.n_heads=64", "model.n_kv_heads=8",
                                         "model.ffn_dim=28672", "model.n_layers=80"]),
    ]:  # fmt: skip
        add("2 sizes", "train", name, train(run0, *items))

    # -- train: output paths and collisions (families 3, 10)
    add("3 outputs", "train", "--output-dir ''", train(""))
    add("3 outputs", "train", "--output-dir a file", train(a_file))
    add("3 outputs", "train", "--output-dir under a file", train(a_file / "run"))
    add("3 outputs", "train", "--output-dir /proc", train("/proc/megatron-adamc-run"))
    add("3 outputs", "train", "--output-dir /sys", train("/sys/megatron-adamc-run"))
    add("3 outputs", "train", "data.cache_dir under a file", train(run0, f"data.cache_dir={a_file}/c"))
    add("3 outputs", "train", "data.index_cache_dir /proc", train(run0, "data.index_cache_dir=/proc/idx"))
    add("3 outputs", "train", "data.index_cache_dir ''", train(run0, 'data.index_cache_dir=""'))
    add("10 collisions", "train", "cache_dir = output dir", train(run0, f"data.cache_dir={run0}"))
    for name, kind in [("metrics.jsonl", "dir"), ("run.json", b"{garbage"), ("checkpoints", "file"), (".lock", "dir")]:
        out = d / f"run_{name.strip('.')}_{'dir' if kind == 'dir' else 'file'}"
        out.mkdir()
        if kind == "dir":
            (out / name).mkdir()
        else:
            (out / name).write_bytes(kind if isinstance(kind, bytes) else b"x")
        add("10 collisions", "train", f"{name} a {'folder' if kind == 'dir' else 'file'}", train(out), watch=[out])

    # -- custom data (family 4)
    data = d / "data"
    data.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copyfile(CORPUS / f"train{ext}", data / f"train{ext}")
    shutil.copyfile(CORPUS / "tokenizer.model", data / "tokenizer.model")
    (data / "truncated.idx").write_bytes((data / "train.idx").read_bytes()[:100])
    shutil.copyfile(data / "train.bin", data / "truncated.bin")
    (data / "garbage.model").write_bytes(b"not a tokenizer" * 10)
    subprocess.run([sys.executable, "-c", "import sys; from megatron_adamc.data import train_tokenizer;"
                    "train_tokenizer([open(sys.argv[1]).read()[:200000]], sys.argv[2], 400)",
                    str(CORPUS / "train.jsonl"), str(data / "small")], check=True, env=env())  # fmt: skip
    subprocess.run([sys.executable, "-m", "megatron_adamc.cli", "preprocess", "--input", str(CORPUS / "train.jsonl"),
                    "--tokenizer", str(data / "tokenizer.model"), "--output-prefix", str(data / "made")],
                   check=True, env=env(), capture_output=True)  # fmt: skip

    def custom(prefix: Path | str, tokenizer: Path | str, *extra: str) -> list[str]:
        split = [] if any(e.startswith(("data.split", "data.valid")) for e in extra) else ["data.split=80,20,0"]
        return train(run0, "data.default_corpus=false", f"data.train={prefix}", f"data.tokenizer={tokenizer}",
                     *split, *extra)  # fmt: skip

    watch = [run0, data]
    add("4 data", "train", "data.train missing", custom(data / "nope", data / "tokenizer.model"), watch=watch)
    add("4 data", "train", "data.train .bin given", custom(f"{data}/train.bin", data / "tokenizer.model"), watch=watch)
    add("4 data", "train", "truncated .idx", custom(data / "truncated", data / "tokenizer.model"), watch=watch)
    add("4 data", "train", "tokenizer missing", custom(data / "train", data / "nope.model"), watch=watch)
    add("4 data", "train", "tokenizer garbage", custom(data / "train", data / "garbage.model"), watch=watch)
    add("4 data", "train", "foreign ids >= vocab", custom(data / "train", data / "small.model"), watch=watch)
    add("4 data", "train", "made with another tokenizer", custom(data / "made", data / "small.model"), watch=watch)
    add(
        "4 data",
        "train",
        "split too small",
        custom(
            data / "made", data / "tokenizer.model", "data.split=999,1,0", "train.seq_len=256", "model.max_seq_len=256"
        ),
        watch=watch,
    )
    add(
        "4 data",
        "train",
        "valid and split",
        custom(data / "train", data / "tokenizer.model", f"data.valid={data}/train", "data.split=9,1,0"),
        watch=watch,
    )
    add("6 processes", "train", "eval pass > validation set", custom(data / "made", data / "tokenizer.model",
                                                                     "data.split=50,50,0", "eval.batches=100000"),
        watch=watch)  # fmt: skip

    # -- a finished run to resume, export and damage (families 7, 8, 9, 10)
    base = d / "finished"
    subprocess.run(cli(*train(base)), check=True, env=env(), capture_output=True)

    def copy(name: str) -> Path:
        out = d / name
        shutil.copytree(base, out)
        return out

    add("10 resume", "train", "changed seed", train(copy("r_seed"), "seed=7", "train.steps=6"), watch=[d / "r_seed"])
    add("10 resume", "train", "changed model", train(copy("r_dim"), "model.dim=32", "train.steps=6"),
        watch=[d / "r_dim"])  # fmt: skip
    out = copy("r_deleted")
    for p in out.glob("checkpoints/step_*"):
        shutil.rmtree(p)
    add("10 collisions", "train", "checkpoints deleted, latest left", train(out, "train.steps=6"), (4,), [out])
    out = copy("r_corrupt")
    for p in out.glob("checkpoints/step_*/*model_states.pt"):
        p.write_bytes(b"corrupt")
    add("7 checkpoints", "train", "every checkpoint corrupt", train(out, "train.steps=6"), (4,), [out])
    out = d / "r_incomplete"
    out.mkdir()
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt").write_bytes(b"cut off")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    add("7 checkpoints", "train", "kill during the first save (starts afresh)", train(out), (0,), [])
    add(
        "9 divergence",
        "train",
        "lr 1e30 (blow-up)",
        train(copy("r_blowup"), "optimizer.lr=1e30", "checkpoint.interval=1", "train.steps=6"),
        (3,),
        [],
    )
    add("9 divergence", "train", "stop_at_step on a bad step", train(copy("r_stop"), "optimizer.lr=1e30",
        "train.max_weight_growth=null", "train.stop_at_step=6", "train.steps=8"), (3,), [])  # fmt: skip
    add("8 ranks", "train", "typo on 2 ranks (launcher)", [*train(d / "r_launch", "trian.steps=3"),
                                                           "--nproc-per-node", "2"], watch=[])  # fmt: skip
    gb1 = d / "r_gb1"
    subprocess.run(cli(*train(gb1, "train.micro_batch_size=1")), check=True, env=env(), capture_output=True)
    add(
        "8 ranks",
        "train",
        "global batch 1 resumed on 2 ranks (launcher)",
        [*train(gb1, "train.micro_batch_size=1", "train.steps=6"), "--nproc-per-node", "2"],
        watch=[gb1],
    )
    add("8 ranks", "torchrun", "typo under plain torchrun (exit 1 by design)",
        train(d / "r_torchrun", "trian.steps=3"), (1,), [],
        prefix=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "megatron_adamc.cli"])  # fmt: skip
    for after in (0.0, 1.0):
        add("10 ctrl-c", "train", f"Ctrl-C {after}s into torch's import", train(d / f"r_cc{after}"), (130,), [],
            interrupt_after=after)  # fmt: skip

    # -- export
    add("3 outputs", "export", "no run.json", ["export", run0, "--format", "hf", "--output", d / "e1"])
    add(
        "3 outputs", "export", "--output /proc", ["export", base, "--format", "hf", "--output", "/proc/e"], watch=[base]
    )
    add("3 outputs", "export", "--output a file", ["export", base, "--format", "hf", "--output", a_file], watch=[base])
    nonempty = d / "nonempty"
    nonempty.mkdir()
    (nonempty / "f").write_text("keep")
    add("3 outputs", "export", "--output not empty", ["export", base, "--format", "hf", "--output", nonempty],
        watch=[base, nonempty])  # fmt: skip
    add("export", "export", "--step missing", ["export", base, "--format", "hf", "--output", d / "e2", "--step", "99"],
        (4,), [base])  # fmt: skip
    add("export", "export", "--dtype foo", ["export", base, "--format", "hf", "--output", d / "e3", "--dtype", "foo"])
    add("export", "export", "--shard-gb 0", ["export", base, "--format", "hf", "--output", d / "e4", "--shard-gb", "0"])
    add("export", "export", "--format onnx", ["export", base, "--format", "onnx", "--output", d / "e5"])

    # -- import-hf
    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{garbage")
    add("import-hf", "import-hf", "dir missing", ["import-hf", d / "nohf", "--output", d / "i1"])
    add("import-hf", "import-hf", "config.json garbage", ["import-hf", hf, "--output", d / "i2"], watch=[hf])
    add("3 outputs", "import-hf", "--output /sys", ["import-hf", hf, "--output", "/sys/i3"], watch=[hf])
    add("3 outputs", "import-hf", "--output under a file", ["import-hf", hf, "--output", a_file / "i"], watch=[hf])

    # -- preprocess and tokenizer
    jsonl = CORPUS / "valid.jsonl"
    tok = data / "tokenizer.model"
    empty = write("empty.jsonl", b"")
    add("preprocess", "preprocess", "input missing", ["preprocess", "--input", d / "no.jsonl", "--tokenizer", tok,
                                                      "--output-prefix", d / "p1"])  # fmt: skip
    add("preprocess", "preprocess", "tokenizer missing", ["preprocess", "--input", jsonl, "--tokenizer", d / "no",
                                                          "--output-prefix", d / "p2"])  # fmt: skip
    add("3 outputs", "preprocess", "--output-prefix a folder", ["preprocess", "--input", jsonl, "--tokenizer", tok,
                                                                "--output-prefix", data])  # fmt: skip
    add("3 outputs", "preprocess", "--output-prefix under a file", ["preprocess", "--input", jsonl, "--tokenizer",
                                                                    tok, "--output-prefix", a_file / "p"])  # fmt: skip
    add("preprocess", "preprocess", "--json-key wrong", ["preprocess", "--input", jsonl, "--tokenizer", tok,
                                                         "--output-prefix", d / "p3", "--json-key", "txt"])  # fmt: skip
    add("preprocess", "preprocess", "--workers 0", ["preprocess", "--input", jsonl, "--tokenizer", tok,
                                                    "--output-prefix", d / "p4", "--workers", "0"])  # fmt: skip
    add("preprocess", "preprocess", "empty input", ["preprocess", "--input", empty, "--tokenizer", tok,
                                                    "--output-prefix", d / "p5"])  # fmt: skip
    add("tokenizer", "tokenizer", "vocab too small", ["tokenizer", "train", "--input", jsonl, "--output", d / "t1",
                                                      "--vocab-size", "10"])  # fmt: skip
    add("tokenizer", "tokenizer", "input missing", ["tokenizer", "train", "--input", d / "no.txt", "--output",
                                                    d / "t2", "--vocab-size", "400"])  # fmt: skip
    add("3 outputs", "tokenizer", "--output under a file", ["tokenizer", "train", "--input", jsonl, "--output",
                                                            a_file / "t", "--vocab-size", "400"])  # fmt: skip

    # -- report
    add("report", "report", "run dir missing", ["report", d / "norun", "--output", d / "rep1"])
    add("report", "report", "no metrics", ["report", d, "--output", d / "rep2"])
    add("3 outputs", "report", "--output a file", ["report", base, "--output", a_file], watch=[base, a_file])
    add("3 outputs", "report", "--output /proc", ["report", base, "--output", "/proc/rep"], watch=[base])

    # -- plan (family 11)
    gb = write("gb.yaml", CONFIG.read_text().replace("  grad_accum: 1\n", "  global_batch_size: 512\n")
               .replace("../deepspeed/zero1.json", str(REPO / "configs" / "deepspeed" / "zero1.json")))  # fmt: skip
    plan = ["plan", "--config", CONFIG, "--gpus-per-node", "8", "--gpu-memory-gb", "80"]
    add("plan", "plan", "--nodes 0", [*plan, "--nodes", "0"])
    add("plan", "plan", "--nodes a", [*plan, "--nodes", "a"])
    add("plan", "plan", "--gpu-memory-gb -1", ["plan", "--config", CONFIG, "--nodes", "1", "--gpus-per-node", "8",
                                               "--gpu-memory-gb", "-1"])  # fmt: skip
    add("plan", "plan", "--mfu 2", [*plan, "--nodes", "1", "--mfu", "2"])
    add("11 plan/slurm", "plan", "global batch 512 on 3x7", ["plan", "--config", gb, "--nodes", "3", "--gpus-per-node",
        "7", "--gpu-memory-gb", "80", "--set", "train.micro_batch_size=1"])  # fmt: skip
    add("plan", "plan", "config typo", [*plan, "--nodes", "1", "--set", "trian.steps=3"])

    # -- slurm submit
    submit = ["slurm", "submit", "--config", CONFIG, "--nodes", "1", "--dry-run"]
    add("11 plan/slurm", "slurm", "comma in --output-dir", [*submit, "--output-dir", d / "a,b"])
    add("11 plan/slurm", "slurm", "% in --output-dir", [*submit, "--output-dir", d / "50%"])
    add("11 plan/slurm", "slurm", "colon with a container", [*submit, "--output-dir", d / "a:b", "--container-image",
                                                             "x.sqsh"])  # fmt: skip
    add("11 plan/slurm", "slurm", "global batch 512 on 3x7", ["slurm", "submit", "--config", gb, "--nodes", "3",
        "--gpus-per-node", "7", "--dry-run", "--set", "train.micro_batch_size=1",
        "--output-dir", d / "s1"])  # fmt: skip
    add("slurm", "slurm", "bad --time", [*submit, "--time", "forever", "--output-dir", d / "s2"])
    add("slurm", "slurm", "--nodes 0", ["slurm", "submit", "--config", CONFIG, "--nodes", "0", "--dry-run"])
    add("slurm", "slurm", "bad --set", [*submit, "--set", "no-equals", "--output-dir", d / "s3"])
    add("slurm", "slurm", "config missing", ["slurm", "submit", "--config", d / "no.yaml", "--nodes", "1", "--dry-run"])
    add("slurm", "slurm", "config typo", [*submit, "--set", "trian.steps=3", "--output-dir", d / "s4"])

    # -- experiment
    add("experiment", "experiment", "unknown name", ["experiment", "nope", "--output-dir", d / "x1"])
    add("experiment", "experiment", "--set unknown key", ["experiment", "steady-state", "--output-dir", d / "x2",
                                                          "--set", "nope=1"])  # fmt: skip
    add("3 outputs", "experiment", "--output-dir ''", ["experiment", "steady-state", "--output-dir", ""])
    add("3 outputs", "experiment", "--output-dir /proc", ["experiment", "steady-state", "--output-dir", "/proc/x"])
    return cases


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def run_case(case: Case, timeout: float) -> dict:
    before = [state_of(p) for p in case.watch]
    cmd = [*(case.prefix or [sys.executable, "-m", "megatron_adamc.cli"]), *case.argv]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
                            start_new_session=True)  # fmt: skip
    try:
        if case.interrupt_after is not None:
            while not _loaded(proc.pid, "libtorch_cpu") and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(case.interrupt_after)
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        code = "timeout"
    lines = [line for line in stderr.splitlines() if ": error: " in line or line.endswith(": interrupted")]
    unchanged = [state_of(p) for p in case.watch] == before
    one_line = code in case.expect and len(lines) == 1 and "Traceback" not in stderr and unchanged
    if case.expect == (0,):
        one_line = code == 0 and "Traceback" not in stderr
    return {
        "family": case.family, "command": case.command, "case": case.name, "exit": code, "expected": case.expect,
        "one_line": one_line, "line": lines[0] if lines else None, "lines": len(lines),
        "traceback": "Traceback" in stderr, "unchanged": unchanged, "seconds": round(time.monotonic() - start, 1),
        "stderr_tail": None if one_line else stderr[-600:],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "user_errors_probe.json"))
    parser.add_argument("-k", default="", help="only cases whose name holds this")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if not (CORPUS / "train.bin").is_file():
        from megatron_adamc.data import prepare_default_data

        prepare_default_data(str(CORPUS), 512, 400_000, progress=False)
    with tempfile.TemporaryDirectory(prefix="user-errors-probe-") as tmp:
        cases = [c for c in build(Path(tmp)) if args.k in c.name]
        results = []
        for number, case in enumerate(cases, 1):
            result = run_case(case, args.timeout)
            results.append(result)
            mark = "ok " if result["one_line"] else "NO "
            print(f"[{number}/{len(cases)}] {mark} {case.command:10} {case.name}: exit {result['exit']} "
                  f"({result['seconds']} s) {result['line'] or ''}"[:220], flush=True)  # fmt: skip
    misses = [r for r in results if not r["one_line"]]
    summary = {"cases": len(results), "one_line": len(results) - len(misses),
               "commands": sorted({r["command"] for r in results}),
               "not_one_line": [f"{r['command']}: {r['case']} (exit {r['exit']})" for r in misses]}  # fmt: skip
    Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
