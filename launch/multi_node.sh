#!/usr/bin/env bash
# Run an mpgroups entry point on several nodes: one call per node, c10d rendezvous.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() {
    cat <<USAGE
Usage: $(basename "$0") --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [options] [-- ARGS...]
Run once on every node; all calls meet at the c10d rendezvous on HOST:PORT (a node's address).
Example (two nodes, node 0 is 10.0.0.1):
  node 0: $(basename "$0") --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29500
  node 1: $(basename "$0") --nnodes 2 --node-rank 1 --rdzv-endpoint 10.0.0.1:29500
With '--nproc-per-node 8 --gp 8' each node holds one group-parallel replica of the model
and the nodes train data parallel (only FSDP2's gathers and reductions cross nodes).

Node options (environment defaults in brackets):
  --nnodes N               number of nodes [NNODES, SLURM_NNODES]
  --node-rank R            this node's index, 0..N-1 [NODE_RANK, SLURM_NODEID]
  --rdzv-endpoint H:P      rendezvous address [RDZV_ENDPOINT, MASTER_ADDR:MASTER_PORT]
  --rdzv-id ID             job id shared by all nodes [RDZV_ID, SLURM_JOB_ID, mpgroups]
$COMMON_USAGE
USAGE
}

NNODES="${NNODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
if [[ -z "$RDZV_ENDPOINT" && -n "${MASTER_ADDR:-}" ]]; then
    RDZV_ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29500}"
fi
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-mpgroups}}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --) shift; ENTRY_ARGS=("$@"); break ;;
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --rdzv-endpoint) need_value "$@"; RDZV_ENDPOINT="$2"; shift 2 ;;
        --rdzv-id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
        *) parse_common "$@" || die "unknown option $1"; shift "$SHIFT" ;;
    esac
done
[[ -n "$NNODES" ]] || die "missing --nnodes (or NNODES)"
[[ -n "$NODE_RANK" ]] || die "missing --node-rank (or NODE_RANK)"
[[ -n "$RDZV_ENDPOINT" ]] || die "missing --rdzv-endpoint HOST:PORT (or RDZV_ENDPOINT)"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] ||
    die "--node-rank must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
[[ "$RDZV_ENDPOINT" == *:* ]] || die "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"
default_nproc
check_gp $((NNODES * NPROC_PER_NODE))

# c10d numbers the nodes as they arrive; NODE_RANK is checked above and exported for logs.
export NODE_RANK
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
    --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    -m "$MODULE" "${ENTRY_ARGS[@]}"
