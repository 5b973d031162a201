#!/usr/bin/env bash
# Runs the deployment tests: installs the Python test tools into
# target/deploy-venv (ignored by git), then pytest. Needs nginx, openssl,
# redis-server (with redis-cli) and python3-venv on the machine; it says which
# are missing rather than installing them.
#   bash deploy/tests/run.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

# System packages are not installed here (.ci/run does that on a fresh machine).
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
{ command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || missing+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deploy tests need: ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
  exit 1
fi

venv="${DEPLOY_VENV:-$root/target/deploy-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.requirements"
if ! cmp -s deploy/tests/requirements.txt "$stamp"; then
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/tests/requirements.txt
  cp deploy/tests/requirements.txt "$stamp"
fi

PYTHONDONTWRITEBYTECODE=1 PATH="$venv/bin:/usr/sbin:$PATH" exec "$venv/bin/python" -m pytest -p no:cacheprovider deploy/tests "$@"
