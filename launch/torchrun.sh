#!/usr/bin/env bash
# Launch DistCA training on this node under torchrun. Run it once per node (Slurm: once per task, see
# slurm.sbatch) with the same MASTER_ADDR/MASTER_PORT everywhere:
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     launch/torchrun.sh configs/llama3-8b-128k.yaml --transport.host <this node's IP>
#
# Every node's local rank 0 starts that node's colocated attention servers; all ranks learn every
# server address through the process group (nothing to edit by hand). Extra arguments are config
# overrides. cluster.n_trainers and cluster.n_servers must equal NNODES * NPROC_PER_NODE.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG.yaml [--section.key value ...]}
shift
: "${NNODES:=1}" "${NODE_RANK:=0}" "${NPROC_PER_NODE:=1}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
PY=${PYTHON:-python}
# fewer glibc malloc arenas: trainer RSS levels off in long runs (BENCHMARKS.md, Soak)
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}
WORLD=$((NNODES * NPROC_PER_NODE))
exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m distca.train.torchrun --config "$CONFIG" \
  --cluster.n_trainers "$WORLD" --cluster.n_servers "$WORLD" "$@"
