"""``megatron-adamc slurm submit``: validate the config, then render (and run) the sbatch line for the shipped
launch/slurm/*.sbatch.

WHY: sizes (nodes, GPUs, time) belong on the command line, not in edited copies of the scripts. Paths are made
absolute here, once, so the job (and every requeue of it) sees the same config and output directory whatever
directory it starts in. The config gets the very checks ``train`` runs first (``load_config`` + ``preflight`` at the
job's world size), so a job never waits in the queue to fail on a typo.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_adamc.errors import UserError
from megatron_adamc.resources import find_file, launch_dir

SCRIPTS = {"train": "train.sbatch", "megatron": "megatron.sbatch"}
# Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_RE = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
SET_RE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("slurm", help="submit training to Slurm (launch/slurm/*.sbatch)")
    sub = parser.add_subparsers(dest="slurm_command", required=True)
    p = sub.add_parser("submit", help="render and run the sbatch command line (or only print it: --dry-run)")
    p.add_argument("--config", help="training config (YAML); with --megatron: a Megatron-LM argument file (@file)")
    p.add_argument("--nodes", required=True, type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one process per GPU")
    p.add_argument(
        "--nproc-per-node",
        "--cpus-per-node",
        dest="nproc_per_node",
        type=int,
        default=None,
        help="processes per node on CPU nodes (gloo); default 1",
    )
    p.add_argument("--time", help="time limit, Slurm format (e.g. 04:00:00 or 2-00:00:00)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--job-name", help="Slurm job name")
    p.add_argument("--output-dir", help="run directory (checkpoints, metrics, Slurm logs); default runs/CONFIG-TIME")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--script", choices=sorted(SCRIPTS), default="train", help="which sbatch script (default train)")
    p.add_argument(
        "--megatron",
        action="store_true",
        help="an unmodified Megatron-LM script (megatron.sbatch): the arguments after -- are Megatron-LM's, parsed by "
        "Megatron-LM's own parser (with AdamC's flags) before anything is queued",
    )
    p.add_argument(
        "--megatron-script",
        default="pretrain_gpt.py",
        metavar="PATH",
        help="with --megatron: the script, a path or a name under MEGATRON_LM_PATH (default pretrain_gpt.py)",
    )
    p.add_argument("megatron_args", nargs=argparse.REMAINDER, help="with --megatron: -- then Megatron-LM arguments")
    p.add_argument("--container-image", help="run inside this image through pyxis (sets CONTAINER_IMAGE)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG", help="extra sbatch option, repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command line and submit nothing")
    p.set_defaults(func=run)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def validate_train_config(config: Path, overrides: list[str], run_dir: Path, world_size: int) -> None:
    """What ``megatron-adamc train`` checks before anything else, at the job's world size; raises its UserError."""
    import contextlib

    from megatron_adamc.config.train import load_config
    from megatron_adamc.train.preflight import preflight

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; stdout is the sbatch line
        preflight(load_config(config, overrides), run_dir, world_size, local=False)  # this is not the GPU node


# Characters a path cannot carry into the job: Slurm expands % patterns in --output, sbatch --export and pyxis
# --container-mounts split on commas, pyxis splits a mount on colons, and a newline ends an #SBATCH line's value.
_SLURM_SPECIAL = {",": "a comma (sbatch and pyxis split lists on it)", "%": "a % (Slurm expands %j, %x... in --output)",
                  "\n": "a newline"}  # fmt: skip


def check_job_path(option: str, path: Path, container: bool) -> None:
    """``path`` survives every place the job writes it; else one UserError naming the character and the fix."""
    special = dict(_SLURM_SPECIAL)
    if container:
        special[":"] = "a colon (pyxis --container-mounts reads src:dst)"
    for char, why in special.items():
        if char in str(path):
            raise UserError(f"{option} {path}: contains {why}; use a path without it (e.g. a symlink to it)")


def megatron_script(name: str) -> Path:
    """The Megatron-LM script to run: a path, or a name under the checkout (MEGATRON_LM_PATH / PYTHONPATH)."""
    from megatron_adamc.megatron.megatron_lm import MegatronLMNotFound, locate_megatron_lm

    path = Path(name).expanduser()
    if not path.is_absolute() and not path.is_file():
        try:
            path = locate_megatron_lm() / name
        except MegatronLMNotFound as err:
            raise UserError(str(err)) from err
    if not path.is_file():
        raise UserError(f"--megatron-script {name}: {path} does not exist; name a Megatron-LM script (pretrain_gpt.py)")
    return path.resolve()


# Megatron-LM's own parser, in a fresh interpreter whose start-up hook adds AdamC's flags (and checks them): what the
# job's ranks will run first. Megatron-LM's parse_args needs no CUDA (initialize_megatron asserts it before calling it).
_PARSE = """
import sys
sys.path.insert(0, sys.argv[1])
import megatron.training.arguments as arguments
sys.argv = [sys.argv[2], *sys.argv[3:]]
arguments.parse_args()
"""


def validate_megatron_args(script: Path, args_file: Path | None, argv: list[str]) -> None:
    """Parse the job's Megatron-LM arguments with Megatron-LM's parser here; its error line as a UserError."""
    from megatron_adamc.megatron.megatron_lm import PluginError
    from megatron_adamc.megatron.pretrain_gpt import expand_arg_files

    try:
        full = expand_arg_files([f"@{args_file}"] if args_file is not None else []) + argv
    except PluginError as err:
        raise UserError(str(err)) from err
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _PARSE, str(script.parent), script.name, *full],
        capture_output=True,
        text=True,
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"},
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines()
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise UserError(f"Megatron-LM's parser refused the arguments: {last}")


def build_command(args: argparse.Namespace) -> tuple[list[str], Path]:
    """The sbatch argv and the resolved output directory; raises UserError on bad input."""
    _positive("--nodes", args.nodes)
    _positive("--gpus-per-node", args.gpus_per_node, minimum=0)
    _positive("--nproc-per-node", args.nproc_per_node)
    if args.gpus_per_node and args.nproc_per_node and args.nproc_per_node != args.gpus_per_node:
        raise UserError("--nproc-per-node is for CPU nodes; with --gpus-per-node there is one process per GPU")
    if args.megatron:
        args.script = "megatron"
    megatron_args = list(args.megatron_args or [])
    if megatron_args[:1] == ["--"]:
        megatron_args = megatron_args[1:]
    if megatron_args and args.script != "megatron":
        raise UserError(f"unexpected arguments {shlex.join(megatron_args)}: Megatron-LM arguments need --megatron")
    if args.config is None and args.script != "megatron":
        raise UserError("--config is required: the training config (YAML)")
    config = find_file(args.config).resolve() if args.config is not None else None
    if config is not None and not config.is_file():
        raise UserError(f"--config {args.config}: no such file")
    if args.time is not None and not TIME_RE.match(args.time):
        raise UserError(f"--time {args.time!r}: use a Slurm time such as 30, 04:00:00 or 2-00:00:00")
    for kv in args.set:
        if not SET_RE.match(kv):
            raise UserError(f"--set {kv!r}: use KEY=VALUE, e.g. --set train.steps=100")
    if args.output_dir:
        out = Path(args.output_dir).expanduser().resolve()
    else:
        stem = config.stem if config is not None else Path(args.megatron_script).stem
        out = (Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    scripts = launch_dir()
    script = scripts / SCRIPTS[args.script]
    for option, path in (("--output-dir", out), ("--config", config), ("the package's launch/slurm", scripts)):
        check_job_path(option, path, bool(args.container_image))
    nproc = args.gpus_per_node or args.nproc_per_node or 1
    if args.script == "train":
        validate_train_config(config, args.set, out, args.nodes * nproc)
    else:
        if args.set:
            raise UserError("--set is for the trainer's config; give Megatron-LM arguments after --")
        script_path = megatron_script(args.megatron_script)
        validate_megatron_args(script_path, config, megatron_args)
    exports = {"NPROC_PER_NODE": str(nproc), "MEGATRON_ADAMC_LAUNCH_DIR": str(scripts)}
    if args.container_image:
        exports["CONTAINER_IMAGE"] = args.container_image
    for key, value in exports.items():
        if "," in value:  # sbatch --export splits on commas
            raise UserError(f"{key}={value!r} contains a comma, which sbatch --export cannot carry; rename the path")

    cmd = ["sbatch", f"--nodes={args.nodes}"]
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.time:
        cmd.append(f"--time={args.time}")
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.job_name:
        cmd.append(f"--job-name={args.job_name}")
    cmd.append(f"--output={out / 'slurm' / '%x-%j.out'}")
    cmd.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()))
    cmd.extend(args.sbatch_arg)
    cmd.append(str(script))
    if args.script == "train":
        cmd.extend(["--config", str(config), "--output-dir", str(out)])
        for kv in args.set:
            cmd.extend(["--set", kv])
    else:
        cmd.extend(["--output-dir", str(out), "--script", str(script_path)])
        if config is not None:
            cmd.extend(["--args-file", str(config)])
        cmd.extend(megatron_args)
    return cmd, out


def run(args: argparse.Namespace) -> int:
    cmd, out = build_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run)")
    (out / "slurm").mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's directory
    print(shlex.join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd)
    return proc.returncode
