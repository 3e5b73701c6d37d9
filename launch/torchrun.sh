#!/usr/bin/env bash
# Launch `llm-lru train` with torchrun, on one node or many.
#
#   launch/torchrun.sh [options] CONFIG.yaml [key=value ...]
#
# options (each also read from the environment variable in brackets):
#   --nproc-per-node P   processes on this node        [NPROC_PER_NODE; default: GPUs, else 1]
#   --nnodes N           number of nodes               [NNODES; default 1]
#   --node-rank R        this node's rank, 0..N-1      [NODE_RANK; default 0]
#   --rdzv HOST:PORT     rendezvous endpoint, the same on every node  [RDZV_ENDPOINT]
#   --rdzv-id ID         job id shared by the nodes    [RDZV_ID; default llm-lru]
#   --max-restarts K     elastic restarts after a failure; each restart resumes from the
#                        newest complete checkpoint (checkpoint.resume=auto)   [MAX_RESTARTS; default 0]
#   --save-grace S       seconds the agent lets its workers save after forwarding a signal,
#                        before it SIGKILLs them                   [SAVE_GRACE; default 300]
#
# Preemption: SIGTERM or SIGUSR1 to the agent (torchrun) is forwarded to every worker, which
# finishes its step, saves a checkpoint and exits (checkpoint.save_signals; RUN/status.json
# then says "preempted"; the agent itself exits 1). torchrun's defaults would not do: it leaves
# SIGUSR1 unhandled (the agent dies, the workers are orphaned) and SIGKILLs the workers 30 s
# after forwarding, so both are set here.
#
# One node:   launch/torchrun.sh --nproc-per-node 8 configs/gpt125m.yaml
# Two nodes:  on each node, launch/torchrun.sh --nnodes 2 --node-rank R --rdzv node0:29500 CONFIG.yaml
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PYTHON="${PYTHON:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3)}"

nproc="${NPROC_PER_NODE:-}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
rdzv="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-llm-lru}"
max_restarts="${MAX_RESTARTS:-0}"
save_grace="${SAVE_GRACE:-300}"

while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --rdzv) rdzv="$2"; shift 2 ;;
    --rdzv-id) rdzv_id="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --save-grace) save_grace="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "torchrun.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "torchrun.sh: missing CONFIG.yaml (see --help)" >&2; exit 2; }

if [ -z "$nproc" ]; then
  nproc="$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.torch_extensions}"

args=(--nproc-per-node "$nproc" --max-restarts "$max_restarts"
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "$save_grace")
if [ "$nnodes" = 1 ] && [ -z "$rdzv" ]; then
  args+=(--standalone)
else
  [ -n "$rdzv" ] || { echo "torchrun.sh: --nnodes $nnodes needs --rdzv HOST:PORT" >&2; exit 2; }
  # c10d rendezvous: every agent meets at HOST:PORT; the node whose address is HOST hosts the store.
  args+=(--nnodes "$nnodes" --node-rank "$node_rank" --rdzv-backend c10d --rdzv-endpoint "$rdzv" --rdzv-id "$rdzv_id")
fi

# Restarted workers must pick up the newest complete checkpoint.
extra=()
if [ "$max_restarts" != 0 ] && ! printf '%s\n' "$@" | grep -q -e '^checkpoint.resume=' -e '^--resume'; then
  extra+=(checkpoint.resume=auto)
fi
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m llm_lru.cli train "$@" "${extra[@]}"
