#!/usr/bin/env bash
# Capture real EndpointSlice responses for tests/functional/recordings/kubernetes/ from a live cluster
# (kubectl configured for it). Writes a list and a watch stream from the list's resourceVersion; scale or
# delete the engine pods meanwhile so the stream holds readiness changes, terminating endpoints, slices
# added and deleted. Ends after SECONDS (default 120) or Ctrl-C.
#   scripts/record-k8s-endpointslices.sh NAMESPACE 'kubernetes.io/service-name=vllm-prefill' [SECONDS]
set -euo pipefail
namespace=${1:?namespace}; selector=${2:?label selector}; seconds=${3:-120}
out=${OUT:-recorded-k8s}; mkdir -p "$out"
base="/apis/discovery.k8s.io/v1/namespaces/$namespace/endpointslices"
query="labelSelector=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$selector")"
kubectl get --raw "$base?$query" > "$out/endpointslices-list.json"
version=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["metadata"]["resourceVersion"])' \
    "$out/endpointslices-list.json")
echo "listed at resourceVersion $version; watching for ${seconds}s" >&2
kubectl get --raw "$base?$query&watch=1&allowWatchBookmarks=true&resourceVersion=$version&timeoutSeconds=$seconds" \
    > "$out/endpointslices-watch.jsonl" || true
wc -l "$out/endpointslices-watch.jsonl" >&2
