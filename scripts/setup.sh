# Sourced by scripts/test and scripts/demo: make .venv with everything, idempotently.
# Needs Python 3.10+; installs Mosquitto (and, for the tests, Chromium) with apt-get when
# missing. EDGE_RESUME_NO_APT=1 skips apt-get.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# System packages the tests need: Mosquitto (a real broker), Chromium + its driver (the
# status page's browser test), openssl (test certificates), zstd and xdelta3 (the codec
# benchmark's peers). Installed only when missing.
# scripts/demo sets EDGE_RESUME_SETUP_FOR=demo: it needs only Mosquitto, and runs without it
# (an embedded broker), so a machine without apt or root still gets the demo.
need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ "${EDGE_RESUME_SETUP_FOR:-test}" != demo ]; then
    command -v chromium >/dev/null || need+=(chromium)
    command -v chromedriver >/dev/null || need+=(chromium-driver)
    command -v openssl >/dev/null || need+=(openssl)
    # the codec benchmark's peers (its harness test runs them when present)
    command -v zstd >/dev/null || need+=(zstd)
    command -v xdelta3 >/dev/null || need+=(xdelta3)
    missing="tests that need them will fail"
else
    missing="the demo uses its embedded broker (amqtt)"
fi
if [ ${#need[@]} -gt 0 ] && [ "${EDGE_RESUME_NO_APT:-0}" != 1 ]; then
    if ! command -v apt-get >/dev/null; then
        echo "setup: no apt-get to install ${need[*]}; $missing" >&2
    else
        echo "setup: installing ${need[*]}" >&2
        as_root apt-get update -qq >/dev/null \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
            || echo "setup: could not install ${need[*]}; $missing" >&2
    fi
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    if ! "$PY" -m venv "$ROOT/.venv" 2>/dev/null; then
        echo "setup: installing python3-venv" >&2
        as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$ROOT/.venv"; "$PY" -m venv "$ROOT/.venv"
    fi
fi
VPY="$ROOT/.venv/bin/python"
STAMP="$ROOT/.venv/.edge-resume-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    # pip's and the build backend's chatter goes to a log; shown when something fails
    LOG="$ROOT/.venv/setup.log"
    echo "setup: installing torch==2.13.0 and edge-resume[server,dev] into .venv (log: .venv/setup.log)" >&2
    "$VPY" -m pip install -q --upgrade pip >"$LOG" 2>&1 || true
    "$VPY" -m pip install -q "torch==2.13.0" >>"$LOG" 2>&1 || true
    "$VPY" -m pip install -q -e "$ROOT[server,dev]" >>"$LOG" 2>&1 || true
    "$VPY" -c "import torch, onnxruntime, paho.mqtt, fastapi, edge_agent, server" >>"$LOG" 2>&1 \
        || { tail -n 25 "$LOG" >&2; echo "setup: installation failed (log: $LOG)" >&2; exit 1; }
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH:/usr/sbin"
