# Sourced by the scripts: sets the array `launch` to the command that starts Python, under
# torchrun when NPROC > 1 or NNODES is set (RDZV_ENDPOINT=host:port for several machines).
launch=(python)
if [ "${NPROC:-1}" -gt 1 ] || [ -n "${NNODES:-}" ]; then
    launch=(python -m torch.distributed.run --nproc_per_node "${NPROC:-1}"
            ${NNODES:+--nnodes "$NNODES"}
            ${RDZV_ENDPOINT:+--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"})
fi
