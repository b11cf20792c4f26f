#!/usr/bin/env bash
# Make the node-to-node TLS material for deploy/kubernetes and store it as the Secret
# tidelog-certs: the cluster CA's certificate and one certificate and key per node, each
# naming the host the other nodes dial (tidelog-N.tidelog.NAMESPACE.svc.cluster.local).
#   deploy/kubernetes/make-certs.sh [REPLICAS (3)] [NAMESPACE (tidelog)] [DIR (./tidelog-certs)]
# Keep DIR/ca/ca.key safe and off the cluster: it signs the certificates of new nodes (run
# again with a larger REPLICAS before scaling the StatefulSet up; existing files are kept).
set -euo pipefail
replicas="${1:-3}"
namespace="${2:-tidelog}"
dir="${3:-./tidelog-certs}"
[ -f "$dir/ca/ca.crt" ] || tidelog certs ca --out "$dir/ca"
args=(--from-file="ca.crt=$dir/ca/ca.crt")
for ((ordinal = 0; ordinal < replicas; ordinal++)); do
  id=$((ordinal + 1))
  host="tidelog-${ordinal}.tidelog.${namespace}.svc.cluster.local"
  [ -f "$dir/nodes/node-${id}.crt" ] ||
    tidelog certs node --id "$id" --ca "$dir/ca" --host "$host" --out "$dir/nodes"
  args+=(--from-file="node-${id}.crt=$dir/nodes/node-${id}.crt")
  args+=(--from-file="node-${id}.key=$dir/nodes/node-${id}.key")
done
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$namespace" create secret generic tidelog-certs "${args[@]}" \
  --dry-run=client -o yaml | kubectl apply -f -
