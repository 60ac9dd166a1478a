#!/usr/bin/env bash
# Run the test tiers one after the other (unit, integration, e2e), so a failure says which tier broke.
# pytest exits 5 when a tier holds no tests: that is not a failure of the suite, it is said and passed over.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=.venv/bin/pytest
status=0
for tier in unit integration e2e; do
  [ -d "tests/$tier" ] || continue
  echo "== tests/$tier"
  "$PYTEST" "tests/$tier" "$@"
  rc=$?
  if [ $rc -eq 5 ]; then
    echo "== tests/$tier: no tests collected"
  elif [ $rc -ne 0 ]; then
    status=$rc
  fi
done
exit $status
