# Shared by the launch scripts: options common to every launch, and torchrun's command line.
# Sourced, not run. Sets: MODULE, ENTRY_ARGS, NPROC_PER_NODE, MAX_RESTARTS, GP, TORCHRUN.

PYTHON="${PYTHON:-python3}"
MODULE="${MODULE:-mpgroups.train}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
GP=""
ENTRY_ARGS=()

COMMON_USAGE="Common options:
  --nproc-per-node N   processes on this node (default: GPUs on this node, else 2)
  --module M           Python module to run (default: mpgroups.train)
  --backend B          auto (NCCL with one GPU per rank, else gloo), gloo or nccl
  --device D           auto, cpu or cuda
  --pg-timeout S       seconds a collective may wait before the job fails (default 300)
  --max-restarts K     restart all workers up to K times after a failure (default 0)
  --gp N               group parallel over N consecutive ranks (one node's, when N is the
                       processes per node), data parallel (FSDP2) over the rest; passed to the
                       module as '--gp N' (default: every rank group-parallel)
  -h, --help           this text
  -- ARGS...           passed to the module (see: python -m mpgroups.train --help)
Environment: PYTHON (interpreter with torch and mpgroups, default python3), and
MPGROUPS_BACKEND, MPGROUPS_DEVICE, MPGROUPS_PG_TIMEOUT as defaults for the options above."

die() {
    echo "$(basename "$0"): $*" >&2
    echo "Try '$(basename "$0") --help'." >&2
    exit 2
}

need_value() {  # need_value OPTION VALUE
    [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "option $1 needs a value"
}

# parse_common OPTION [VALUE]: handles a common option; returns 1 when OPTION is not one.
# Sets SHIFT to the number of words consumed.
parse_common() {
    SHIFT=2
    case "$1" in
        --nproc-per-node) need_value "$@"; NPROC_PER_NODE="$2" ;;
        --module) need_value "$@"; MODULE="$2" ;;
        --backend) need_value "$@"; export MPGROUPS_BACKEND="$2" ;;
        --device) need_value "$@"; export MPGROUPS_DEVICE="$2" ;;
        --pg-timeout) need_value "$@"; export MPGROUPS_PG_TIMEOUT="$2" ;;
        --max-restarts) need_value "$@"; MAX_RESTARTS="$2" ;;
        --gp) need_value "$@"; GP="$2" ;;
        *) return 1 ;;
    esac
}

default_nproc() {
    if [[ -z "${NPROC_PER_NODE:-}" ]]; then
        NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)') ||
            die "cannot run $PYTHON with torch; set PYTHON to the environment's interpreter"
    fi
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer"
    [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer"
}

check_gp() {  # check_gp PROCESSES: validate --gp against the job's size, pass it to the module
    [[ -n "$GP" ]] || return 0
    [[ "$GP" =~ ^[1-9][0-9]*$ ]] || die "--gp must be a positive integer, got '$GP'"
    (( $1 % GP == 0 )) || die "--gp $GP must divide the job's $1 processes"
    ENTRY_ARGS=(--gp "$GP" "${ENTRY_ARGS[@]}")
}
