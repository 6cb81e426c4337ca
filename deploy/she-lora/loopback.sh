#!/usr/bin/env bash
# Loopback check of the real deployment: 1 SuperLink + 2 SuperNodes on 127.0.0.1, one
# tiny SHE-LoRA round via `flwr run`. Usage (from the repo root):
#   bash deploy/she-lora/loopback.sh [WORKDIR]
# Every process it starts is stopped by PID on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${BIN:-$ROOT/.venv/bin}"
WORK="${1:-$(mktemp -d)}"
export PATH="$BIN:$PATH"  # the SuperLink/SuperNode spawn flower-superexec by name
mkdir -p "$WORK"
LINK_PORT="${LINK_PORT:-9092}"  # SuperLink (Fleet + Control + Runtime APIs share it in flwr 1.41)
NODE_PORT="${NODE_PORT:-9094}"  # SuperNode i serves its local Runtime API on NODE_PORT+i
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/python" -m hetune.protocols.she_lora.keys "$WORK/keys" 8192 60,40,60 40
# Flower config (FLWR_HOME) with a SuperLink connection named "loopback".
export FLWR_HOME="$WORK/flwr"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$LINK_PORT"
insecure = true
TOML

"$BIN/flower-superlink" --insecure --host 0.0.0.0 --port "$LINK_PORT" --database "$WORK/state.db" >"$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for i in 0 1; do
  FLWR_HOME="$WORK/node$i" "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$LINK_PORT" --port $((NODE_PORT + i)) \
    --node-config "partition-id=$i num-partitions=2 secret-ctx='$WORK/keys/secret.ctx'" >"$WORK/supernode$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 5
"$BIN/flwr" run "$ROOT/deploy/she-lora" loopback --stream \
  --run-config "public-ctx='$WORK/keys/public.ctx' clients=2 rounds=1 max-samples=200 local-steps=2 batch-size=16"
