#!/bin/bash -l
# A two-node prefill/decode cluster on SLURM, without Kubernetes:
#   node 0: launch_prefill (all its GPUs, --tp $TP) and launch_router (PD mode, port $ROUTER_PORT)
#   node 1: launch_decode  (all its GPUs, --tp $TP)
# Submit:  sbatch k8s/slurm/disagg-pd.sh            (settings below as environment variables:
#          MODEL=/shared/Llama-3.1-8B-Instruct TP=8 IB_DEVICE=mlx5_0 sbatch k8s/slurm/disagg-pd.sh)
# Then:    curl http://<node0>:8000/v1/chat/completions -H 'content-type: application/json' \
#               -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":16}'
# Metrics: each process serves GET /metrics on its HTTP port (k8s/monitoring/prometheus.yml, job
# disagg-static). The job runs until its time limit or `scancel`.

#SBATCH --job-name=disagg-pd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm_logs/%x_%j.out
#SBATCH --error=slurm_logs/%x_%j.err

set -euo pipefail

VENV=${VENV:-$PWD/.venv}                   # where disagg is installed (pip install -e .)
MODEL=${MODEL:-}                           # HF folder on shared storage; empty: embedded default model
TP=${TP:-8}                                # GPUs per server (each server is one node here)
PREFILL_PORT=${PREFILL_PORT:-30000}
DECODE_PORT=${DECODE_PORT:-30001}
BOOTSTRAP_PORT=${BOOTSTRAP_PORT:-8998}     # prefill's KV bootstrap port (decode connects to it)
ROUTER_PORT=${ROUTER_PORT:-8000}
IB_DEVICE=${IB_DEVICE:-}                   # e.g. mlx5_0,mlx5_1: HCAs for the KV transfer; empty: UCX picks
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-1800}   # seconds to wait for both servers' /health
LOG_DIR=${LOG_DIR:-slurm_logs}
EXTRA_ARGS=${EXTRA_ARGS:-}                 # more server flags, e.g. "--page-size 64 --mem-fraction-static 0.8"

mkdir -p "$LOG_DIR"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#NODES[@]}" -lt 2 ]; then
    echo "[ERROR] need 2 nodes, got: ${NODES[*]}" >&2
    exit 1
fi
PREFILL_NODE=${NODES[0]}
DECODE_NODE=${NODES[1]}
echo "[INFO] prefill on $PREFILL_NODE:$PREFILL_PORT (bootstrap $BOOTSTRAP_PORT), decode on $DECODE_NODE:$DECODE_PORT"

# flags both servers share (word splitting of EXTRA_ARGS is intended)
SERVER_ARGS=(--tp "$TP" --host 0.0.0.0)
[ -n "$MODEL" ] && SERVER_ARGS+=(--model-path "$MODEL")
[ -n "$IB_DEVICE" ] && SERVER_ARGS+=(--disaggregation-ib-device "$IB_DEVICE")
# shellcheck disable=SC2206
SERVER_ARGS+=($EXTRA_ARGS)

PIDS=()
cleanup() {
    # srun forwards the signal to its remote task
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait || true
}
trap cleanup EXIT INT TERM

srun --nodes=1 --ntasks=1 --nodelist="$PREFILL_NODE" --output="$LOG_DIR/prefill_%j.log" \
    launch_prefill "${SERVER_ARGS[@]}" --port "$PREFILL_PORT" \
    --disaggregation-bootstrap-port "$BOOTSTRAP_PORT" &
PIDS+=($!)
srun --nodes=1 --ntasks=1 --nodelist="$DECODE_NODE" --output="$LOG_DIR/decode_%j.log" \
    launch_decode "${SERVER_ARGS[@]}" --port "$DECODE_PORT" &
PIDS+=($!)

wait_healthy() {  # URL: poll GET URL/health until 200, a server step dies, or STARTUP_TIMEOUT
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until python3 -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/health', timeout=5)" "$1" 2>/dev/null; do
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "[ERROR] a server exited; see $LOG_DIR" >&2; exit 1; }
        done
        [ "$SECONDS" -lt "$deadline" ] || { echo "[ERROR] $1 not healthy after ${STARTUP_TIMEOUT}s" >&2; exit 1; }
        sleep 2
    done
    echo "[INFO] $1 is healthy"
}
wait_healthy "http://$PREFILL_NODE:$PREFILL_PORT"
wait_healthy "http://$DECODE_NODE:$DECODE_PORT"

# the router needs no GPU: --overlap shares node 0 with the prefill step
srun --overlap --nodes=1 --ntasks=1 --nodelist="$PREFILL_NODE" --output="$LOG_DIR/router_%j.log" \
    launch_router --pd-disaggregation \
    --prefill "http://$PREFILL_NODE:$PREFILL_PORT" "$BOOTSTRAP_PORT" \
    --decode "http://$DECODE_NODE:$DECODE_PORT" \
    --host 0.0.0.0 --port "$ROUTER_PORT" &
PIDS+=($!)
echo "[INFO] router: http://$PREFILL_NODE:$ROUTER_PORT (OpenAI API); waiting until the job ends"

# exit (and tear the others down through the trap) as soon as any step ends
wait -n
echo "[ERROR] a step exited; see $LOG_DIR" >&2
exit 1
