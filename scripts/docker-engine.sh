#!/usr/bin/env bash
# Make sure a Docker engine answers, installing and starting one if needed.
#
# Used by the demo and test commands. Idempotent: if `docker info` already answers, it
# changes nothing. Otherwise it installs Debian's docker.io (plus runsc for gVisor and
# debootstrap for local base images), registers runsc as an extra runtime, starts dockerd
# in the background and waits for it, failing with one clear line after a timeout.
set -euo pipefail

TIMEOUT_S="${STOCKADE_DOCKERD_TIMEOUT:-60}"
LOG=/var/log/stockade-dockerd.log

say() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

engine_answers() { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }

install_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v runsc >/dev/null 2>&1 || missing+=(runsc)
  [ "${#missing[@]}" -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]} (or start a Docker engine yourself)"
  say "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Register gVisor as the runtime "runsc"; its own network is off so that only network-less
# servers can use it (Stockade refuses runsc for a server that asks for a network).
configure_runtimes() {
  local conf=/etc/docker/daemon.json runsc_path
  runsc_path="$(command -v runsc || true)"
  [ -n "$runsc_path" ] || return 0
  mkdir -p /etc/docker
  if [ -f "$conf" ] && grep -q '"runsc"' "$conf"; then return 0; fi
  if [ -f "$conf" ] && [ -s "$conf" ]; then
    python3 - "$conf" "$runsc_path" <<'PY'
import json, sys
path, runsc = sys.argv[1], sys.argv[2]
with open(path) as f:
    conf = json.load(f)
conf.setdefault("runtimes", {})["runsc"] = {"path": runsc, "runtimeArgs": ["--network=none"]}
with open(path, "w") as f:
    json.dump(conf, f, indent=2)
PY
  else
    printf '{\n  "runtimes": {"runsc": {"path": "%s", "runtimeArgs": ["--network=none"]}}\n}\n' \
      "$runsc_path" >"$conf"
  fi
  say "registered runsc ($runsc_path) in $conf"
}

start_dockerd() {
  [ "$(id -u)" -eq 0 ] || die "no Docker engine answers and only root can start one"
  if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is running but not answering yet; waiting"
  else
    say "starting dockerd (log: $LOG)"
    nohup dockerd >"$LOG" 2>&1 </dev/null &
  fi
  local waited=0
  until engine_answers; do
    sleep 1
    waited=$((waited + 1))
    if [ "$waited" -ge "$TIMEOUT_S" ]; then
      tail -n 5 "$LOG" >&2 2>/dev/null || true
      die "dockerd did not answer within ${TIMEOUT_S}s (see $LOG)"
    fi
  done
}

if engine_answers; then
  exit 0
fi
install_packages
configure_runtimes
start_dockerd
say "engine ready: $(docker version --format '{{.Server.Version}}')"
