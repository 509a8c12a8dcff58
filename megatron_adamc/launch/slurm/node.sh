#!/usr/bin/env bash
# One srun task per node: runs torchrun for this node and makes preemption signals reach the Python workers.
#
# WHY a wrapper: torchrun does not forward SIGUSR1 to its workers (torch.distributed.elastic handles only
# SIGTERM, SIGINT, SIGHUP and SIGQUIT by default), the default action of SIGUSR1 would kill torchrun, and on
# SIGTERM torchrun terminates its workers itself after 30 s. So torchrun is started with SIGUSR1 and SIGTERM
# ignored (and told not to handle SIGTERM: PET_SIGNALS_TO_HANDLE), and this script forwards those signals to
# torchrun's children, the workers, whose PreemptionHandler turns them into a checkpoint at the next step. When
# Slurm signals every process of the step (proctrack), a worker gets the signal twice: harmless, it is a flag.
#
# Usage (from the sbatch scripts): srun ... node.sh ENTRY [ARGS...]
#   ENTRY is `-m module` or a script path, passed to torchrun as is.
# Environment: SLURM_NNODES, SLURM_NODEID, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (set by the sbatch script),
#   WORKER_SIGNAL (what SIGUSR1 becomes for the workers; USR1, or TERM for Megatron-LM's --exit-signal-handler),
#   MEGATRON_ADAMC_SIGNAL_FILE (megatron.sbatch: node 0 writes it on a signal, to request the requeue).
# shellcheck disable=SC2317  # functions below run from traps
set -uo pipefail

: "${SLURM_NNODES:?node.sh runs as an srun task of launch/slurm/*.sbatch}"
: "${SLURM_NODEID:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${NPROC_PER_NODE:?}"
WORKER_SIGNAL="${WORKER_SIGNAL:-USR1}"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "${LAUNCH_DIR}/env.sh"

echo "[node.sh] $(hostname) slurm node ${SLURMD_NODENAME:-?} id ${SLURM_NODEID}/${SLURM_NNODES}:" \
    "${NPROC_PER_NODE} processes, rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2

# Ignored signals stay ignored across exec: torchrun inherits SIG_IGN for USR1 and TERM (the workers too, until
# their PreemptionHandler installs its handlers).
# The launcher: torchrun's own agent that exits with the failed rank's code (2 input, 3 diverged, 4 checkpoint,
# 5 locked; megatron_adamc/cli/launch.py), where torchrun exits 1 for all of them. TORCHRUN overrides it.
if [[ -n "${TORCHRUN:-}" ]]; then LAUNCHER=("${TORCHRUN}"); else LAUNCHER=(python3 -m megatron_adamc.cli.launch); fi
(
    trap '' USR1 TERM
    PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT" exec "${LAUNCHER[@]}" \
        --nnodes="${SLURM_NNODES}" --node-rank="${SLURM_NODEID}" --nproc-per-node="${NPROC_PER_NODE}" \
        --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT}" "$@"
) &
torchrun_pid=$!

children_of() {
    local stat pid rest
    for stat in /proc/[0-9]*/stat; do
        read -r pid rest 2>/dev/null <"${stat}" || continue
        rest="${rest##*) }"              # fields after "(comm) "; the 2nd of them is the parent pid
        read -r _state ppid _ <<< "${rest}"
        [[ "${ppid}" == "$1" ]] && echo "${pid}"
    done
}

forward() {
    local sig="$1" pid
    # megatron.sbatch: the workers (Megatron-LM) do not request the requeue themselves; record the signal here.
    if [[ -n "${MEGATRON_ADAMC_SIGNAL_FILE:-}" && "${SLURM_NODEID}" == 0 ]]; then
        echo "SIG${sig}" >"${MEGATRON_ADAMC_SIGNAL_FILE}" || true
    fi
    for pid in $(children_of "${torchrun_pid}"); do
        kill -s "${sig}" "${pid}" 2>/dev/null || true
    done
    echo "[node.sh] $(hostname) node ${SLURM_NODEID}: forwarded SIG${sig} to the workers" >&2
}
trap 'forward "${WORKER_SIGNAL}"' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until torchrun itself has exited.
while kill -0 "${torchrun_pid}" 2>/dev/null; do
    wait "${torchrun_pid}"
done
wait "${torchrun_pid}"   # bash keeps the exit status of a reaped background job
rc=$?
echo "[node.sh] node ${SLURM_NODEID}: torchrun exited with ${rc}" >&2
exit "${rc}"
