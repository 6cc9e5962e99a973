# Sourced by scripts/gateway and scripts/test: finds Python >= 3.12, creates .venv and installs tollhouse.
#
# Choose the interpreter with TOLLHOUSE_PYTHON=/path/to/python3.12; otherwise the first Python >= 3.12
# among python3.13, python3.12, python3 on PATH and the versions under pyenv is used. An existing .venv
# is recreated when TOLLHOUSE_PYTHON names a different interpreter than the one it was made with.

set -euo pipefail

TOLLHOUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$TOLLHOUSE_ROOT/.venv"

is_new_enough() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

# Print the Python version and the resolved path of the base interpreter. A venv's Python prints the
# same line as the interpreter that created the venv.
python_identity() {
    "$1" -c 'import os, sys; print("%d.%d" % sys.version_info[:2], os.path.realpath(getattr(sys, "_base_executable", sys.executable)))' 2>/dev/null
}

find_python() {
    if [ -n "${TOLLHOUSE_PYTHON:-}" ]; then
        if ! command -v "$TOLLHOUSE_PYTHON" >/dev/null 2>&1; then
            if [ -e "$TOLLHOUSE_PYTHON" ]; then
                echo "tollhouse: TOLLHOUSE_PYTHON=$TOLLHOUSE_PYTHON is not executable. Set it to the path of a Python >= 3.12." >&2
            else
                echo "tollhouse: TOLLHOUSE_PYTHON=$TOLLHOUSE_PYTHON not found. Set it to the path of a Python >= 3.12, or unset it." >&2
            fi
            return 1
        fi

        if is_new_enough "$TOLLHOUSE_PYTHON"; then
            echo "$TOLLHOUSE_PYTHON"
            return 0
        fi
        echo "tollhouse: TOLLHOUSE_PYTHON=$TOLLHOUSE_PYTHON is not a Python >= 3.12" >&2
        return 1
    fi
    local candidates=(python3.13 python3.12 python3)
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then
        pyenv_root="$(pyenv root)"
    fi
    # Newest first: sort -V orders 3.13.0 after 3.12.1.
    if [ -d "$pyenv_root/versions" ]; then
        while IFS= read -r dir; do
            candidates+=("$dir/bin/python")
        done < <(ls -d "$pyenv_root"/versions/3.* 2>/dev/null | sort -V -r)
    fi
    local candidate
    for candidate in "${candidates[@]}"; do
        if is_new_enough "$candidate"; then
            command -v "$candidate" 2>/dev/null || echo "$candidate"
            return 0
        fi
    done
    echo "tollhouse: no Python >= 3.12 found (tried ${candidates[*]})." >&2
    echo "Install one, or set TOLLHOUSE_PYTHON=/path/to/python3.12." >&2
    return 1
}

PYTHON=""
RECREATE=false
if [ ! -x "$VENV/bin/python" ] || ! is_new_enough "$VENV/bin/python"; then
    RECREATE=true
elif [ -n "${TOLLHOUSE_PYTHON:-}" ]; then
    PYTHON="$(find_python)"
    WANT_PYTHON="$(python_identity "$PYTHON" || true)"
    HAVE_PYTHON="$(python_identity "$VENV/bin/python" || true)"
    if [ "$WANT_PYTHON" != "$HAVE_PYTHON" ]; then
        echo "tollhouse: $VENV uses Python $HAVE_PYTHON, but TOLLHOUSE_PYTHON is Python $WANT_PYTHON: recreating it" >&2
        RECREATE=true
    fi
fi
if [ "$RECREATE" = true ]; then
    if [ -z "$PYTHON" ]; then
        PYTHON="$(find_python)"
    fi
    echo "tollhouse: creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the project's requirements changed since the last install.
STAMP="$VENV/.tollhouse-installed"
WANT="$(cat "$TOLLHOUSE_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "tollhouse: installing into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$TOLLHOUSE_ROOT[test]"
    echo "$WANT" > "$STAMP"
fi

# Install the AI SDK packages that tests/test_node_sdk.py runs, when Node.js and npm are on PATH and
# node_modules is missing or older than the lockfile. npm writes node_modules/.package-lock.json on every
# install, so its modification time is that of the last install. A failed install only warns, so that the
# Python tests still run, and tests/test_node_sdk.py then skips (or fails when CI is set).
NODE_TESTS="$TOLLHOUSE_ROOT/tests/node"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    if [ ! -f "$NODE_TESTS/node_modules/.package-lock.json" ] \
        || [ "$NODE_TESTS/package-lock.json" -nt "$NODE_TESTS/node_modules/.package-lock.json" ]; then
        echo "tollhouse: installing the Node test packages into $NODE_TESTS/node_modules" >&2
        if ! (cd "$NODE_TESTS" && npm ci --no-audit --no-fund >&2); then
            echo "tollhouse: warning: npm ci failed in $NODE_TESTS, so tests/test_node_sdk.py will skip (or fail when CI is set)." >&2
        fi
    fi
fi
