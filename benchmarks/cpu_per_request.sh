#!/usr/bin/env bash
# User and system CPU of one proxy process per request, from /proc, under a closed-loop load.
#   bash benchmarks/cpu_per_request.sh pdproxy|floor [stream|nostream] [requests]
# Starts 2 mock prefill engines, 1 mock decode engine and the proxy on free loopback ports, warms up
# with 300 requests, then reads utime/stime of the proxy around REQUESTS requests at concurrency 32.
# A diagnostic for profiling work, not the benchmark: benchmarks/harness.py measures against the
# other systems in one run. Run it under `flock /tmp/pdproxy-heavy.lock` on a shared machine.
set -euo pipefail
MODE=${1:-pdproxy}; STREAM=${2:-nostream}; N=${3:-3000}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
P1=$(port); P2=$(port); D=$(port); X=$(port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for spec in "prefill $P1" "prefill $P2" "decode $D"; do
    set -- $spec
    "$PY" -m pdproxy mock --role "$1" --port "$2" --log-level warning >/dev/null 2>&1 & pids+=($!)
done
sleep 2
if [ "$MODE" = pdproxy ]; then
    "$PY" -m pdproxy --prefill-servers "127.0.0.1:$P1,127.0.0.1:$P2" --decode-servers "127.0.0.1:$D" \
        --host 127.0.0.1 --port "$X" --no-access-log --prefill-policy round_robin --decode-policy round_robin \
        >/dev/null 2>&1 & pids+=($!)
else
    "$PY" benchmarks/floor_proxy.py --prefill "http://127.0.0.1:$P1,http://127.0.0.1:$P2" \
        --decode "http://127.0.0.1:$D" --port "$X" >/dev/null 2>&1 & pids+=($!)
fi
PROXY=${pids[-1]}
sleep 2
EXTRA=(); [ "$STREAM" = nostream ] && EXTRA=(--no-stream)
"$PY" benchmarks/loadgen.py --url "http://127.0.0.1:$X" --requests 300 --concurrency 32 "${EXTRA[@]}" \
    --max-tokens 64 >/dev/null
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$PROXY/stat")
"$PY" benchmarks/loadgen.py --url "http://127.0.0.1:$X" --requests "$N" --concurrency 32 "${EXTRA[@]}" \
    --max-tokens 64 >/dev/null
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$PROXY/stat")
tick=$(getconf CLK_TCK)
awk -v m="$MODE" -v st="$STREAM" -v n="$N" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v t="$tick" \
    'BEGIN { printf "%s %s: user %.3f ms, sys %.3f ms per request\n", m, st, du * 1000 / t / n, ds * 1000 / t / n }'
