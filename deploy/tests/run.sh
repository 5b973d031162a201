#!/usr/bin/env bash
# Runs the deployment tests: installs Debian's nginx if missing and the Python
# test tools into target/deploy-venv (ignored by git), then pytest.
#   bash deploy/tests/run.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
  else
    echo "deploy tests need nginx (apt-get install nginx)" >&2
    exit 1
  fi
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
