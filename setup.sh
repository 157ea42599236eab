#!/usr/bin/env bash
# One idempotent set-up: system packages FFCV compiles against, a venv in .venv with the exact tested
# set from requirements.lock, and fastpix installed editable. Re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")"

# FFCV's compiled part builds and links against these at run time (see ../shared/DEPENDENCIES.md).
apt_needed=()
for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt_needed+=("$pkg")
done
if [ ${#apt_needed[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${apt_needed[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_needed[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv

# The stamp holds the hash of what was installed; unchanged lock and setup.cfg mean nothing to do.
stamp=.venv/.fastpix-installed
want=$(cat requirements.lock setup.cfg | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv (first time: ~2 minutes, ~7 GB)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv)"
