#!/usr/bin/env bash
# Build the skinclf image with the shared container recipe (podman + runc, the local Debian base)
# and check it: one line per check, exit status 1 if any fails. Containers and the image it makes
# are removed on exit (the shared base image is kept). Run from anywhere:
#
#   tools/container_check.sh [IMAGES_DIR]
#
# IMAGES_DIR: dermoscopic images for predict (default ../shared/data/ham10000-fullres; synthetic
# images when absent); the first $CHECK_FILES (40) are used. The host side of the comparison is
# `python3 -m skinclf` run in this checkout, with python3's packages (CI: the light install's venv).
# Environment: SHARED (../shared), KEEP_IMAGE=1 keeps the image as localhost/skinclf:check.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$repo/../shared}
podman="$shared/containers/podman.sh"
base=localhost/debian-python:bookworm
tag=localhost/skinclf:check
max_mb=700
wait_s=90                           # longest wait for the server to answer /healthz
images_src=${1:-$shared/data/ham10000-fullres}
n_files=${CHECK_FILES:-40}
run_id="skinclf-check-$$"
failed=0
work=$(mktemp -d)

cleanup() {
    "$podman" rm --force --ignore --time 5 "$run_id-serve" >/dev/null 2>&1 || true
    [ "${KEEP_IMAGE:-0}" = 1 ] || "$podman" rmi --force "$tag" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; failed=1; }
die() { echo "FAIL $*"; exit 1; }
bounded() { timeout --kill-after=10 "$@"; }  # every podman call has a limit: bounded <seconds> cmd...

[ -x "$podman" ] || die "no shared container recipe at $podman (set SHARED)"
host_skinclf=(python3 -m skinclf)
(cd "$repo" && "${host_skinclf[@]}" --version >/dev/null 2>&1) || die "python3 cannot run skinclf here to compare with (pip install . first)"

# --- the images to classify: a sample of real ones, else a few synthetic ones -----------------------
mkdir -p "$work/in" "$work/out-host" "$work/out" "$work/out-ro"
if [ -d "$images_src" ]; then
    find "$images_src" -maxdepth 1 -type f -iname '*.jpg' | sort | head -n "$n_files" | xargs -r cp -t "$work/in"
fi
if [ -z "$(ls -A "$work/in")" ]; then
    python3 - "$work/in" <<'EOF' || die "could not make synthetic images (needs numpy and Pillow)"
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(8):
    yy, xx = np.mgrid[:300, :400]
    blob = np.exp(-(((xx - 200) / 90.0) ** 2 + ((yy - 150) / 70.0) ** 2))
    rgb = np.stack([200 - 90 * blob, 160 - 100 * blob, 140 - 90 * blob], -1) + rng.normal(0, 6, (300, 400, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype("uint8")).save(f"{sys.argv[1]}/synthetic-{i}.jpg", quality=92)
EOF
fi
n=$(ls "$work/in" | wc -l)
# The container runs as uid 10001: its output folders must be writable by it.
chown 10001:10001 "$work/out" "$work/out-ro" 2>/dev/null || chmod 777 "$work/out" "$work/out-ro"

# --- build ------------------------------------------------------------------------------------------
bounded 300 "$shared/containers/make-base.sh" "$base" >/dev/null || die "base image $base: make-base.sh failed"
start=$(date +%s)
if ! bounded 900 "$podman" build --format docker --layers=false --build-arg BASE="$base" -t "$tag" \
        -f "$repo/Containerfile" "$repo" >"$work/build.log" 2>&1; then
    tail -20 "$work/build.log"
    die "build failed (last lines above)"
fi
build_s=$(( $(date +%s) - start ))
size=$("$podman" image inspect --format '{{.Size}}' "$tag")
size_mb=$(( size / 1000000 ))
ok "build: $tag on $base in ${build_s} s"
if [ "$size_mb" -le "$max_mb" ]; then ok "size: ${size_mb} MB (limit ${max_mb} MB; the base alone is $(( $("$podman" image inspect --format '{{.Size}}' "$base") / 1000000 )) MB)"
else fail "size: ${size_mb} MB is over ${max_mb} MB"; fi

# --- what the image holds and how it runs -----------------------------------------------------------
run=(bounded 120 "$podman" run --rm --health-cmd=none)  # no health timers for one-off commands (no systemd here)
user=$("$podman" image inspect --format '{{.Config.User}}' "$tag")
uid=$("${run[@]}" --network=none --entrypoint id "$tag" -u 2>/dev/null)
if [ -n "$uid" ] && [ "$uid" != 0 ] && [ "$user" != root ] && [ -n "$user" ]; then ok "non-root: runs as user $user (uid $uid)"
else fail "non-root: image user '$user', uid '$uid'"; fi
# Nothing that could send anything: no TensorFlow, no OpenTelemetry SDK or exporter, no pip.
held=$("${run[@]}" --network=none --entrypoint python "$tag" -c '
import importlib.util
def held(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
print(",".join(m for m in ("tensorflow", "keras", "opentelemetry.sdk", "opentelemetry.exporter", "pip") if held(m)) or "none")' 2>/dev/null)
if [ "$held" = none ]; then ok "contents: no TensorFlow, no pip, no telemetry SDK or exporter"; else fail "contents: image holds $held"; fi

# --- predict: inside (no network, images read-only, output on a second volume) vs on the host -------
(cd "$repo" && "${host_skinclf[@]}" predict "$work/in" --out "$work/out-host/results.csv" >/dev/null 2>"$work/host.err") \
    || { cat "$work/host.err"; die "predict on the host failed"; }
if "${run[@]}" --network=none -v "$work/in:/in:ro" -v "$work/out:/out" "$tag" \
        predict /in --out /out/results.csv >/dev/null 2>"$work/in.err"; then
    if cmp -s "$work/out-host/results.csv" "$work/out/results.csv"; then
        ok "predict --network=none: results.csv ($n images) equals the host's byte for byte"
    else
        fail "predict --network=none: results.csv differs from the host's"; diff "$work/out-host/results.csv" "$work/out/results.csv" | head -5
    fi
    # The CSV's paths are relative to the folder given, so they match as they are. Its sidecar
    # results.csv.json names where the folder and the model were and when it ran: those keys are
    # set aside, everything else (model SHA-256s, options, counts, thresholds) must be equal.
    if python3 - "$work/out-host/results.csv.json" "$work/out/results.csv.json" <<'EOF'
import json, sys
def strip(d):
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k not in ("created", "directory", "path", "onnx")}
    return [strip(v) for v in d] if isinstance(d, list) else d
a, b = (json.load(open(p)) for p in sys.argv[1:])
sys.exit(0 if strip(a) == strip(b) and a["model"]["created"] == b["model"]["created"] else 1)
EOF
    then ok "predict --network=none: results.csv.json equal but for paths and run time"
    else fail "predict --network=none: results.csv.json differs beyond paths and run time"; fi
else
    tail -5 "$work/in.err"; fail "predict --network=none failed"
fi
locked=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)  # as compose.yaml runs it
if "${run[@]}" "${locked[@]}" --network=none -v "$work/in:/in:ro" -v "$work/out-ro:/out" "$tag" \
        predict /in --out /out/results.csv >/dev/null 2>"$work/ro.err" \
   && cmp -s "$work/out-host/results.csv" "$work/out-ro/results.csv"; then
    ok "predict --read-only --cap-drop ALL --network=none: works, same CSV"
else
    tail -5 "$work/ro.err"; fail "predict --read-only --network=none"
fi

# Another model bundle, mounted read-only and named with --model (here: the bundled one, from the checkout).
if "${run[@]}" --read-only --network=none -v "$repo/models:/models:ro" -v "$work/in:/in:ro" -v "$work/out-ro:/out" "$tag" \
        predict /in --out /out/other.csv --model /models/skinclf-mobilenet.keras >/dev/null 2>"$work/model.err" \
   && cmp -s "$work/out-host/results.csv" "$work/out-ro/other.csv"; then
    ok "predict --model /models/...: a mounted bundle is used, same CSV"
else
    tail -5 "$work/model.err"; fail "predict --model with a mounted bundle"
fi

# --- serve: the default command, read-only, through a published loopback port ----------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if bounded 60 "$podman" run -d --name "$run_id-serve" "${locked[@]}" -p "127.0.0.1:$port:8000" "$tag" >/dev/null 2>"$work/serve.err"; then
    url="http://127.0.0.1:$port"
    deadline=$(( $(date +%s) + wait_s ))
    until curl -fsS --max-time 3 "$url/healthz" >"$work/health.json" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ] || [ "$("$podman" inspect --format '{{.State.Running}}' "$run_id-serve" 2>/dev/null)" != true ]; then
            break
        fi
        sleep 1
    done
    if grep -q '"ok"' "$work/health.json" 2>/dev/null; then
        ok "serve (read-only, no capabilities): /healthz answers through 127.0.0.1:$port after $(( $(date +%s) - deadline + wait_s )) s"
        if bounded 30 "$podman" healthcheck run "$run_id-serve" >/dev/null 2>&1; then ok "serve: the image's HEALTHCHECK passes"
        else fail "serve: the image's HEALTHCHECK fails"; fi
        first=$(ls "$work/in" | head -1)
        # The API's CSV for one image must be that image's row of the host's predict CSV.
        if curl -fsS --max-time 60 -F "files=@$work/in/$first" "$url/api/predict?format=csv" >"$work/served.csv" \
           && [ "$(sed -n 2p "$work/served.csv")" = "$(grep -m1 -F "\"$first\"" "$work/out-host/results.csv")" ] \
           && [ "$(head -1 "$work/served.csv")" = "$(head -1 "$work/out-host/results.csv")" ]; then
            ok "serve: POST /api/predict classifies $first as predict does ($(sed -n 2p "$work/served.csv" | cut -d, -f2-3))"
        else
            fail "serve: POST /api/predict did not give the host's row for $first"; head -3 "$work/served.csv" 2>/dev/null
        fi
        # The guards still mean something on 0.0.0.0: another host name, another site's page.
        evil_host=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H 'Host: evil.example' "$url/healthz")
        evil_origin=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -H 'Origin: http://evil.example' \
            -F "files=@$work/in/$first" "$url/api/predict")
        if [ "$evil_host" = 400 ] && [ "$evil_origin" = 403 ]; then ok "serve: Host evil.example refused (400), Origin evil.example refused (403)"
        else fail "serve: guards answered Host evil.example $evil_host (want 400), Origin $evil_origin (want 403)"; fi
        suid=$(bounded 30 "$podman" exec "$run_id-serve" id -u 2>/dev/null)
        if [ -n "$suid" ] && [ "$suid" != 0 ]; then ok "serve: the server runs as uid $suid"; else fail "serve: server uid '$suid'"; fi
    else
        fail "serve: no answer on $url/healthz within ${wait_s} s"; bounded 10 "$podman" logs "$run_id-serve" 2>&1 | tail -5
    fi
else
    cat "$work/serve.err"; fail "serve: the container did not start"
fi
bounded 30 "$podman" rm --force --time 5 "$run_id-serve" >/dev/null 2>&1

if [ "$failed" = 0 ]; then echo "container check passed"; else echo "container check FAILED"; fi
exit "$failed"
