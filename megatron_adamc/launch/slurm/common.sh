# shellcheck shell=bash disable=SC2034  # a sourced library: the variables it sets are used by its callers
# What train.sbatch and megatron.sbatch share: the output directory, the rendezvous, processes per node, the
# optional container, running the srun step with signal forwarding, and the requeue at the end.
#
# WHY here and not in Python: the batch shell is the one process that lives outside any container, sees the
# whole allocation, and survives the srun step, so it is the place to resolve the output directory once and to
# run `scontrol requeue` after every node's workers have saved and exited.

adamc_log() { echo "[${SLURM_JOB_NAME:-sbatch} ${SLURM_JOB_ID:-?}] $*" >&2; }
adamc_die() { adamc_log "error: $*"; exit 2; }

# Split "$@" into OUTPUT_DIR (absolute, resolved once: relative paths are taken from the submit directory, and
# the default depends only on the job id, which a requeued job keeps) and REST_ARGS (everything else).
adamc_parse_output_dir() {
    OUTPUT_DIR=""
    REST_ARGS=()
    while (($#)); do
        case "$1" in
            --output-dir) [[ $# -ge 2 ]] || adamc_die "--output-dir needs a value"; OUTPUT_DIR="$2"; shift 2 ;;
            --output-dir=*) OUTPUT_DIR="${1#*=}"; shift ;;
            *) REST_ARGS+=("$1"); shift ;;
        esac
    done
    [[ -n "${OUTPUT_DIR}" ]] || OUTPUT_DIR="runs/slurm-${SLURM_JOB_ID}"
    [[ "${OUTPUT_DIR}" == /* ]] || OUTPUT_DIR="${SLURM_SUBMIT_DIR}/${OUTPUT_DIR}"
    mkdir -p "${OUTPUT_DIR}/slurm" || adamc_die "cannot create --output-dir ${OUTPUT_DIR}"
}

# MASTER_ADDR: the first node of the allocation, by the address Slurm has for it (NodeAddr), not a hostname
# guess that may resolve to localhost. MASTER_PORT: derived from the job id (and the restart count, so a
# requeued job does not race the old store's socket). RDZV_ADDR / RDZV_PORT override both.
adamc_rendezvous() {
    local first addr
    first="$(scontrol show hostnames "${SLURM_JOB_NODELIST}")" || adamc_die "scontrol show hostnames failed"
    first="${first%%$'\n'*}"
    [[ -n "${first}" ]] || adamc_die "cannot read the node list (SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-})"
    addr="$(scontrol show node "${first}")" || adamc_die "scontrol show node ${first} failed"
    addr="${addr#*NodeAddr=}"
    [[ "${addr}" != *NodeName=* ]] || addr=""   # no NodeAddr field: fall back to the node name
    addr="${addr%%[[:space:]]*}"
    MASTER_ADDR="${RDZV_ADDR:-${addr:-${first}}}"
    MASTER_PORT="${RDZV_PORT:-$((15000 + (SLURM_JOB_ID % 10000) * 4 + ${SLURM_RESTART_COUNT:-0} % 4))}"
    export MASTER_ADDR MASTER_PORT
}

# NPROC_PER_NODE: the GPUs Slurm gave the node; on CPU nodes the number given (NPROC_PER_NODE), else 1.
adamc_nproc_per_node() {
    local gpus="${SLURM_GPUS_ON_NODE:-}"
    if [[ -z "${gpus}" && -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        gpus="${SLURM_GPUS_PER_NODE##*:}"   # "8", "gpu:8" or "a100:8"
    fi
    if [[ "${gpus}" =~ ^[1-9][0-9]*$ ]]; then
        NPROC_PER_NODE="${gpus}"
    else
        NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
    fi
    [[ "${NPROC_PER_NODE}" =~ ^[1-9][0-9]*$ ]] || adamc_die "NPROC_PER_NODE must be a positive integer, got '${NPROC_PER_NODE}'"
    export NPROC_PER_NODE
}

# CONTAINER_ARGS: pyxis flags when CONTAINER_IMAGE is set (an enroot .sqsh file or a registry image). The
# submit directory, the launch scripts and the output directory are mounted at the same paths inside;
# CONTAINER_MOUNTS adds more (pyxis syntax: src:dst[,src:dst...]).
adamc_container_args() {
    CONTAINER_ARGS=()
    [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
    local mounts="${SLURM_SUBMIT_DIR}:${SLURM_SUBMIT_DIR}" dir
    for dir in "${LAUNCH_DIR}" "${OUTPUT_DIR}"; do
        [[ "${dir}/" == "${SLURM_SUBMIT_DIR}/"* ]] || mounts+=",${dir}:${dir}"
    done
    [[ -z "${CONTAINER_MOUNTS:-}" ]] || mounts+=",${CONTAINER_MOUNTS}"
    CONTAINER_ARGS=(--container-image="${CONTAINER_IMAGE}" --container-mounts="${mounts}"
        --container-workdir="${SLURM_SUBMIT_DIR}")
}

# Run the srun step in the background and forward SIGUSR1/SIGTERM that reach this batch shell (the
# `--signal=B:USR1@...` warning, `scancel --batch --signal=USR1`) to it; srun passes them on to every node.
# Sets STEP_RC.
adamc_run_step() {
    "$@" &
    STEP_PID=$!
    trap 'adamc_forward USR1' USR1
    trap 'adamc_forward TERM' TERM
    while kill -0 "${STEP_PID}" 2>/dev/null; do
        wait "${STEP_PID}" || true
    done
    STEP_RC=0
    wait "${STEP_PID}" || STEP_RC=$?
    trap - USR1 TERM
}

adamc_forward() {
    adamc_log "batch shell got SIG$1: forwarding it to the srun step"
    kill -s "$1" "${STEP_PID}" 2>/dev/null || true
}

# After the step: requeue when rank 0 asked for it (its checkpoint is saved) or, up to MAX_FAILURE_REQUEUES
# times per output directory, when the step failed (a dead rank took the job down: resume from the last
# checkpoint). Exits the script.
adamc_finish() {
    local failures_file="${OUTPUT_DIR}/slurm/failure-requeues" failures=0
    if [[ -f "${MEGATRON_ADAMC_REQUEUE_FILE}" && "${STEP_RC}" -eq 0 ]]; then
        adamc_log "preempted: checkpoint saved, requeueing job ${SLURM_JOB_ID} (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
        scontrol requeue "${SLURM_JOB_ID}" || adamc_die "scontrol requeue ${SLURM_JOB_ID} failed"
        sleep 60 # the requeue ends this script; do not report completion meanwhile
        exit 0
    fi
    case "${STEP_RC}" in
    2 | 3 | 4 | 5) # bad input, divergence, no loadable checkpoint, a held run directory: a rerun fails the same way
        adamc_log "step failed with exit ${STEP_RC}: not requeued (see the error line above; docs/resilience.md)"
        exit "${STEP_RC}"
        ;;
    esac
    if [[ "${STEP_RC}" -ne 0 ]]; then
        [[ -f "${failures_file}" ]] && failures="$(cat "${failures_file}")"
        if ((failures < ${MAX_FAILURE_REQUEUES:-0})); then
            echo $((failures + 1)) >"${failures_file}"
            adamc_log "step failed (exit ${STEP_RC}): requeueing to resume from the last checkpoint" \
                "(failure requeue $((failures + 1)) of ${MAX_FAILURE_REQUEUES})"
            scontrol requeue "${SLURM_JOB_ID}" || adamc_die "scontrol requeue ${SLURM_JOB_ID} failed"
            sleep 60
            exit 0
        fi
        adamc_log "step failed with exit ${STEP_RC}"
        exit "${STEP_RC}"
    fi
    adamc_log "finished"
    exit 0
}
