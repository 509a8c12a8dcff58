"""A real two-node Slurm cluster on this one machine, for tests and for trying the sbatch scripts.

WHY: the launch scripts' hard parts (signals through srun and torchrun, requeue, rendezvous from the node list)
only show up on a real slurmctld + slurmd, so the tests run one: Debian's Slurm and munge, a slurm.conf with
``NodeName=n1,n2`` on localhost (each slurmd on its own port, started with ``slurmd -N``), all state in one
directory. Every daemon is started here in the foreground and stopped by its pid.

Use from Python (``LocalSlurmCluster(state_dir).start()`` / ``.stop()``) or by hand::

    python tests/slurm/local_cluster.py up /tmp/slurm-dev     # prints: export SLURM_CONF=...
    python tests/slurm/local_cluster.py down /tmp/slurm-dev
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun"]
NODES = ["n1", "n2"]


class ClusterUnavailable(Exception):
    """Slurm cannot be installed or started here; the message says why (tests skip with it)."""


def missing_binaries() -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]
    return [b for b in BINARIES if not any(Path(d, b).exists() for d in dirs)]


def ensure_installed() -> None:
    """apt-get install Slurm and munge when missing; raise ClusterUnavailable when that cannot work."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm/munge not installed ({', '.join(missing_binaries())}) and not root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm/munge not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {tail[0]}")
    if missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get: {', '.join(missing_binaries())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """Two Slurm nodes (n1, n2) on localhost, every file under ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike, cpus_per_node: int = 2) -> None:
        self.dir = Path(state_dir).resolve()
        self.cpus = cpus_per_node
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        # Free ports, so that this cluster does not collide with another one (or a real slurmd) on this host.
        self.ctld_port = _free_port()
        self.slurmd_ports = {n: _free_port() for n in NODES}

    # -- configuration ------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, scontrol, ...) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("munge", "ctld", "log", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.slurmd_ports[n]} "
            f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            f"""# Written by tests/slurm/local_cluster.py: two nodes on localhost.
ClusterName=adamc-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
# Job ids (and the rendezvous ports the scripts derive from them) apart from another cluster running on this host.
FirstJobId={random.randrange(1000, 9000)}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/ctld/slurmctld.pid
SlurmdPidFile={d}/spool/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )
        for n in NODES:
            (d / "spool" / n).mkdir(parents=True, exist_ok=True)

    def _write_munge_key(self) -> Path:
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        return key

    # -- daemons ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def start(self, timeout: float = 60.0) -> LocalSlurmCluster:
        """Start munged, slurmctld, slurmd n1 and n2; return once sinfo shows both nodes idle."""
        ensure_installed()
        self._write_conf()
        key = self._write_munge_key()
        try:
            self._spawn(
                "munged",
                [
                    _sbin("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--pid-file={self.dir / 'munge' / 'munged.pid'}", f"--log-file={self.dir / 'log' / 'munged.log'}",
                    f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
                ],
            )  # fmt: skip
            self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._run(["scontrol", "ping"]).returncode == 0, timeout, "slurmctld to answer")
            for n in NODES:
                self._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "both nodes idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True)

    def _all_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with {proc.returncode}; see {self.dir / 'log'}")
            if ok():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}; see {self.dir / 'log'}")

    def stop(self) -> None:
        """Stop every daemon this object started, by pid: slurmd first, munged last."""
        for name in [f"slurmd-{n}" for n in NODES] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    # -- jobs ---------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RunTime, Restarts, ExitCode, NodeList, ...)."""
        out = self._run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        fields: dict[str, str] = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {info.get('JobState')}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: local_cluster.py up|down STATE_DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurmCluster(argv[1])
    pidfile = cluster.dir / "pids.json"
    if argv[0] == "up":
        cluster.start()
        pidfile.write_text(json.dumps(cluster.pids()))
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    for name, pid in reversed(list(json.loads(pidfile.read_text()).items()) if pidfile.exists() else []):
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {name} (pid {pid})")
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
