#!/usr/bin/env bash
# CI legs on the two ends of the supported range, each in a fresh virtualenv on
# Python 3.13 (Colab's Python):
#   colab   exactly Colab's preinstalled stack (jax/jaxlib 0.7.2, Flax 0.11.2,
#           Optax 0.2.8, Orbax 0.12.4, Chex 0.1.90, tokenizers 0.22.2); the
#           project is then installed WITH its dependencies, and the leg fails
#           if pip's resolver would install or change any of them;
#   newest  the newest jax / Flax / Optax / Orbax / Chex that pyproject.toml admits.
# Each runs the test suite; the torch-based parity tests skip (no torch here:
# the main leg, .ci/run's first command, runs them).
#
#   .ci/legs.sh [colab|newest ...]      default: both
# Environment: LEGS_PYTHON (a Python 3.13), LEGS_DIR (where the venvs go; a
# fresh temporary directory by default), LEGS_PYTEST_ARGS (default "-n 2 --dist loadfile").
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Colab's CPU/GPU/TPU images, as of 2026-08 (googlecolab/backend-info, pip-freeze*.txt).
COLAB_STACK=(jax==0.7.2 jaxlib==0.7.2 flax==0.11.2 optax==0.2.8 orbax-checkpoint==0.12.4
             chex==0.1.90 tokenizers==0.22.2)
WATCHED="jax jaxlib flax optax orbax-checkpoint chex tokenizers numpy"

find_python313() {
    local candidates=("${LEGS_PYTHON:-}")
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/3.13*/bin/python3.13)
    fi
    candidates+=("${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13
                 "$(command -v python3.13 || true)")
    local py
    for py in "${candidates[@]}"; do
        if [[ -n "$py" && -x "$py" ]] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "legs.sh: no Python 3.13 found (set LEGS_PYTHON, or 'pyenv install 3.13')" >&2
    return 1
}

versions() {  # name==version for each watched package, one per line
    "$1/bin/python" - $WATCHED <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(f"{name}: not installed")
EOF
}

assert_nothing_to_install() {  # pip's own resolver: installing the project touches none of them
    local venv=$1 report
    report=$(mktemp)
    "$venv/bin/pip" install -q --dry-run --report "$report" ".[test,hf,notebooks]"
    "$venv/bin/python" - "$report" $WATCHED <<'EOF'
import json, sys
from packaging.utils import canonicalize_name
report = json.load(open(sys.argv[1]))
watched = {canonicalize_name(n) for n in sys.argv[2:]}
planned = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]]
touched = [p for p in planned if canonicalize_name(p.split("==")[0]) in watched]
print("resolver dry run: would install", len(planned), "packages:", ", ".join(planned))
print("resolver dry run: of", ", ".join(sorted(watched)), "it would install or change:",
      ", ".join(touched) or "nothing")
sys.exit(1 if touched else 0)
EOF
    rm -f "$report"
}

run_leg() {
    local leg=$1 py=$2 venv="$LEGS_DIR/$1" start=$SECONDS
    echo "=== leg $leg: venv $venv"
    "$py" -m venv --clear "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    if [[ $leg == colab ]]; then
        "$venv/bin/pip" install -q "${COLAB_STACK[@]}"
        local before; before=$(versions "$venv")
        assert_nothing_to_install "$venv"
        "$venv/bin/pip" install -q ".[test,hf,notebooks]"   # with dependencies, no --no-deps
        local after; after=$(versions "$venv")
        if [[ "$before" != "$after" ]]; then
            echo "leg colab: installing the project changed Colab's packages:" >&2
            diff <(echo "$before") <(echo "$after") >&2 || true
            return 1
        fi
        echo "leg colab: Colab's versions unchanged by the project's install"
    else
        # The newest releases that pyproject.toml admits, chosen by pip's resolver.
        "$venv/bin/pip" install -q --upgrade --upgrade-strategy eager ".[test,hf,notebooks]" \
            jax jaxlib flax optax orbax-checkpoint chex tokenizers
    fi
    echo "leg $leg: $("$venv/bin/python" -VV)"
    versions "$venv" | sed "s/^/leg $leg:   /"
    # From the checkout, as the main leg; the installed copy only provides the
    # dependencies. pytest's last line is the count ("N passed, M skipped").
    "$venv/bin/python" -m pytest ${LEGS_PYTEST_ARGS:--n 2 --dist loadfile} -q -p no:cacheprovider
    echo "=== leg $leg: done in $((SECONDS - start)) s"
}

main() {
    local py legs=("$@")
    [[ ${#legs[@]} -gt 0 ]] || legs=(colab newest)
    py=$(find_python313)
    if [[ -z "${LEGS_DIR:-}" ]]; then
        LEGS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/transformer-jax-legs.XXXXXX")
        trap 'rm -rf "$LEGS_DIR"' EXIT   # ours, so ours to remove (~2 GB of venvs)
    fi
    local leg failed=()
    for leg in "${legs[@]}"; do
        case $leg in colab|newest) ;; *)
            echo "legs.sh: unknown leg '$leg'; valid: colab, newest" >&2; return 2 ;;
        esac
    done
    for leg in "${legs[@]}"; do
        # A new process keeps set -e in force inside the leg (it is off in a
        # subshell on the left of ||) and lets the next leg still run.
        LEGS_DIR=$LEGS_DIR bash "$0" _one "$leg" "$py" || failed+=("$leg")
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "legs.sh: failed leg(s): ${failed[*]}" >&2
        return 1
    fi
}

if [[ ${1:-} == _one ]]; then
    run_leg "$2" "$3"
else
    main "$@"
fi
