#!/usr/bin/env bash
# Set up the environment (once), start a local tidelog node in the background, create a topic,
# produce records and consume them back, and print where the metrics are.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

TL=.venv/bin/tidelog
DATA=.tidelog/demo/node-1
PORT="${TIDELOG_DEMO_PORT:-9092}"
METRICS_PORT="${TIDELOG_DEMO_METRICS_PORT:-9644}"
export TIDELOG_BOOTSTRAP="127.0.0.1:$PORT"
mkdir -p "$DATA"

if [ -f "$DATA/pid" ] && kill -0 "$(cat "$DATA/pid")" 2>/dev/null; then
  echo "node 1 is already running (pid $(cat "$DATA/pid"))"
else
  nohup "$TL" node start --id 1 --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
    --metrics-port "$METRICS_PORT" >"$DATA/node.log" 2>&1 &
  echo $! >"$DATA/pid"
  echo "started node 1 (pid $!), log in $DATA/node.log"
fi

for _ in $(seq 1 100); do
  if "$TL" topic list >/dev/null 2>&1; then break; fi
  sleep 0.1
done
"$TL" topic list >/dev/null || { echo "error: node did not start; see $DATA/node.log" >&2; exit 1; }

"$TL" topic describe demo >/dev/null 2>&1 || "$TL" topic create demo --partitions 3
"$TL" topic describe demo

echo "== producing 5 keyed records (key:value lines on stdin)"
printf 'gbp:0.71\nusd:1.00\neur:0.92\ninr:83.1\naud:1.52\n' | "$TL" produce demo --key-separator :
echo "== consuming them back"
"$TL" consume demo --from-beginning --format kv --max 5 --timeout-ms 5000

echo "== a short benchmark: 200,000 records of 100 bytes, acks=1"
"$TL" bench produce --topic demo-bench --records 200000 --record-bytes 100 --acks 1 --partitions 1

cat <<TXT

node 1 is running in the background:
  gRPC     127.0.0.1:$PORT   (export TIDELOG_BOOTSTRAP=127.0.0.1:$PORT for the CLI)
  metrics  http://127.0.0.1:$METRICS_PORT/metrics
  data     $DATA
stop it with:  kill \$(cat $DATA/pid)
TXT
