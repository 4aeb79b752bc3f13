# Sourced by scripts/test, scripts/demo and the benchmarks: find Python >= 3.11, create .venv if it
# is missing, and (re)install the project with its dev extras whenever pyproject.toml changed.
# After sourcing: $ROOT is the checkout, $PY the virtual environment's python, .venv/bin on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "kachery-node needs Python 3.11 or newer; none found (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV" >&2
  "$(_find_python)" -m venv "$VENV"
fi
PY="$VENV/bin/python"
_stamp="$VENV/.kachery-install-stamp"
_want="$(cat "$ROOT/pyproject.toml" | "$PY" -c 'import hashlib,sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest())')"
if [ "$(cat "$_stamp" 2>/dev/null || true)" != "$_want" ]; then
  echo "==> installing kachery-node and its dev tools into .venv" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" >&2
  echo "$_want" > "$_stamp"
fi
# Byte-compile the package, as pip does for a regular install: an editable one compiles each
# module on import, and where PYTHONDONTWRITEBYTECODE is set (this VM, many container images) it
# never keeps the result, so every command paid ~40-60 ms to compile the same modules again.
"$PY" -m compileall -q -j 0 "$ROOT/node" "$ROOT/protocol" "$ROOT/storage" >/dev/null
export PATH="$VENV/bin:$PATH"
