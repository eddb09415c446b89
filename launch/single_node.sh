#!/usr/bin/env bash
# Run an mpgroups entry point on this machine under torchrun --standalone.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options] [-- ARGS...]
Runs 'torchrun --standalone --nproc-per-node N -m MODULE ARGS' on this machine.
Example: $(basename "$0") --nproc-per-node 2 -- --epochs 4
         $(basename "$0") --nproc-per-node 4 --gp 2    # 2 x 2 mesh: FSDP2 over 2 pairs

$COMMON_USAGE
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --) shift; ENTRY_ARGS=("$@"); break ;;
        *) parse_common "$@" || die "unknown option $1"; shift "$SHIFT" ;;
    esac
done
default_nproc
check_gp "$NPROC_PER_NODE"

exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" -m "$MODULE" "${ENTRY_ARGS[@]}"
