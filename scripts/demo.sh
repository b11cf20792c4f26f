#!/usr/bin/env bash
# Set up the environment (once), start a local 3-node tidelog cluster in the background, create
# a replicated topic, produce records and consume them back, and print where the metrics are.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

TL=.venv/bin/tidelog
# Commands run here find the cluster through .tidelog/cluster/cluster.json.
unset TIDELOG_BOOTSTRAP

if "$TL" cluster status >/dev/null 2>&1 && "$TL" topic list >/dev/null 2>&1; then
  echo "the local cluster is already running"
else
  "$TL" cluster up --nodes 3
fi

"$TL" topic describe demo >/dev/null 2>&1 ||
  "$TL" topic create demo --partitions 3 --replication-factor 3
"$TL" topic describe demo

echo "== producing 5 keyed records (key:value lines on stdin), acks=all"
printf 'gbp:0.71\nusd:1.00\neur:0.92\ninr:83.1\naud:1.52\n' | "$TL" produce demo --key-separator :
echo "== consuming them back"
"$TL" consume demo --from-beginning --format kv --max 5 --timeout-ms 10000

echo "== a short benchmark: 300,000 records of 100 bytes, replication factor 3, acks=all"
"$TL" bench produce --topic demo-bench --records 300000 --record-bytes 100 --acks all \
  --partitions 3 --replication-factor 3

echo
"$TL" cluster status
cat <<TXT

The cluster keeps running in the background (data and logs in .tidelog/cluster/).
Metrics: http://<metrics address>/metrics for each node in the table above.
Try:   .venv/bin/tidelog cluster kill 1 && .venv/bin/tidelog cluster status
Stop:  .venv/bin/tidelog cluster down
TXT
