# shellcheck shell=bash
# NCCL / InfiniBand / threading settings for every launch script, in ONE place. Sourced on each node.
# Every value here is only a default. Precedence: the file named by MEGATRON_ADAMC_ENV_FILE (a site file, sourced
# last) > the environment exported before sbatch > these defaults. Put site-specific values in that site file.

# NCCL over InfiniBand (ignored by gloo on CPU nodes).
: "${NCCL_IB_DISABLE:=0}"                # set 1 on clusters without IB (falls back to sockets)
: "${NCCL_SOCKET_IFNAME:=^lo,docker0}"   # bootstrap/socket traffic: any interface but loopback and docker
: "${NCCL_IB_TIMEOUT:=22}"               # fewer spurious timeouts on large IB fabrics
: "${NCCL_IB_RETRY_CNT:=7}"
: "${NCCL_ASYNC_ERROR_HANDLING:=1}"      # legacy name; torch >= 2.2 reads TORCH_NCCL_ASYNC_ERROR_HANDLING
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}" # a hung collective kills the rank instead of hanging the job
: "${NCCL_DEBUG:=WARN}"
# Set these per site when needed (left unset on purpose): NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL,
# NCCL_TOPO_FILE, UCX_NET_DEVICES.

# Threads per worker: the CPUs Slurm gave the task divided by the workers on the node.
: "${OMP_NUM_THREADS:=1}"
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"    # Megatron tensor/sequence parallel overlap requires it

export NCCL_IB_DISABLE NCCL_SOCKET_IFNAME NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_ASYNC_ERROR_HANDLING \
    TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS

if [[ -n "${MEGATRON_ADAMC_ENV_FILE:-}" ]]; then
    # shellcheck source=/dev/null
    source "${MEGATRON_ADAMC_ENV_FILE}"
fi
