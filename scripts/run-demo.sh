#!/usr/bin/env bash
# `make run`: a broker (only if none answers on 127.0.0.1:1883), the coordinator and the agent with
# its embedded default (bundled model, SQLite outbox in ./var/edge-agent, watched folder
# ./var/edge-agent/inbox). Prints where results can be seen. Ctrl-C stops what this script started.
# A demo: the broker is anonymous and listens on loopback only, acks and commands are unsigned (the
# agent warns about it once). Deployments use deploy/mosquitto/ and keys (docs/mqtt.md, "Authentication").
#
#   DEMO_ONESHOT=1  drop one sample photo, wait for its result on MQTT, print it and exit (a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
HOST=127.0.0.1
PORT=1883
DEMO=var/demo
INBOX=var/edge-agent/inbox
DASH_PORT=${DASH_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); r=s.connect_ex(("127.0.0.1", 8090)); s.close(); print(8090 if r else 0)')}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
mkdir -p "$DEMO" "$INBOX"

pids=()
cleanup() {
  local pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mqtt_up() {  # true when something on HOST:PORT answers an MQTT CONNECT with a CONNACK
  "$BIN/python" - "$HOST" "$PORT" <<'EOF'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x05\x00\x04demo")
        sys.exit(0 if s.recv(4)[:1] == b"\x20" else 1)
except OSError:
    sys.exit(1)
EOF
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    if ((SECONDS > deadline)); then echo "run-demo: timed out waiting for $what" >&2; return 1; fi
    sleep 0.2
  done
}

if mqtt_up; then
  echo "run-demo: using the MQTT broker already listening on $HOST:$PORT"
else
  [ -x "$MOSQUITTO" ] || { echo "run-demo: mosquitto not found; run 'make system-deps' (as root)" >&2; exit 1; }
  cat > "$DEMO/mosquitto.conf" <<EOF
# demo broker: anonymous, loopback only. For a real deployment use deploy/mosquitto/ (TLS, passwords, ACL).
listener $PORT $HOST
allow_anonymous true
persistence false
log_dest file $PWD/$DEMO/mosquitto.log
EOF
  [ "$(id -u)" -eq 0 ] && echo "user root" >> "$DEMO/mosquitto.conf"
  "$MOSQUITTO" -c "$DEMO/mosquitto.conf" &
  pids+=($!)
  wait_until 10 "mosquitto" mqtt_up
  echo "run-demo: started mosquitto on $HOST:$PORT (pid ${pids[-1]}): anonymous access, loopback only"
fi

cat > "$DEMO/coordinator.yaml" <<EOF
mqtt:
  host: $HOST
  port: $PORT
  client_id: demo-coordinator
store:
  type: sqlite
  path: $PWD/$DEMO/coordinator.db
dashboard:
  enabled: true
  bind: 127.0.0.1
  port: $DASH_PORT
EOF
"$BIN/edge-coordinator" run --config "$DEMO/coordinator.yaml" 2> "$DEMO/coordinator.log" &
pids+=($!)
coordinator=${pids[-1]}
wait_until 30 "the coordinator" grep -qs "coordinator running" "$DEMO/coordinator.log"
DASH_URL=$(grep -o 'dashboard on http://[^ ]*' "$DEMO/coordinator.log" | head -n 1 | cut -d' ' -f3)

: > "$DEMO/agent.log"
"$BIN/edge-agent" run 2> >(tee -a "$DEMO/agent.log" >&2) &
pids+=($!)
agent=${pids[-1]}
wait_until 120 "the agent" grep -qs "running: pipelines" "$DEMO/agent.log"

sample=tests/data/crops/ibean/angular_leaf_spot/angular_leaf_spot_train_0.jpg  # a field photo (tests/data/LICENSES.md)
cat <<EOF

  edge-agent is running (device edge-01).
  This is a loopback demo: the broker on $HOST:$PORT takes anonymous clients and acks and commands are
  unsigned. To deploy, use deploy/mosquitto/ (passwords, ACL, TLS) and keys (docs/mqtt.md, "Authentication").
  Drop a leaf photo into:   $PWD/$INBOX
  for example:              cp '$sample' $INBOX/
  See results on MQTT:      mosquitto_sub -h $HOST -p $PORT -v -t 'edge/v1/#'
  Coordinator dashboard:    ${DASH_URL:-off}   (results stored in $DEMO/coordinator.db)
  Processed files:          $INBOX/done   rejected ones (with a .reason.json): $INBOX/rejected
  Logs:                     $DEMO/agent.log  $DEMO/coordinator.log
  Stop with Ctrl-C.

EOF

if [ "${DEMO_ONESHOT:-0}" = "1" ]; then
  [ -f "$sample" ] || { echo "run-demo: sample photo $sample is missing" >&2; exit 1; }
  sub=(mosquitto_sub -h "$HOST" -p "$PORT" -t 'edge/v1/edge-01/results/#' -C 1 -W 60)
  "${sub[@]}" > "$DEMO/oneshot.json" &
  subpid=$!
  sleep 1  # let mosquitto_sub subscribe first (results are not retained)
  cp "$sample" "$INBOX/demo-$(date +%s).jpg"
  if wait "$subpid"; then
    echo "run-demo: result received on MQTT:"
    "$BIN/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); b=d["body"]; print(json.dumps({"topic_device": d["device"], "seq": d["seq"], "result_id": d["result_id"], "model": b["model"], "sector": b.get("sector"), "top": b["predictions"][:1], "timings_ms": b["timings_ms"]}, indent=2))' "$DEMO/oneshot.json"
    exit 0
  fi
  echo "run-demo: no result within 60 s" >&2
  exit 1
fi

wait "$agent"
