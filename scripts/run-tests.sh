#!/usr/bin/env bash
# Run the test tiers one after the other (unit, integration, e2e), so a failure says which tier broke.
# pytest exits 5 when a tier holds no tests: that is not a failure of the suite, it is said and passed over.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PYTEST=.venv/bin/pytest
# Python 3.11 parses the source line of every formatted traceback (for its ^^^ markers), and gRPC formats one on
# every cancelled stream. When that runs inside a garbage-collected task's finaliser in the middle of another parse
# (pytest importing a module to rewrite it), CPython 3.11 fails that parse with "SystemError: AST constructor
# recursion depth mismatch" (gh-106905) and pytest crashes after all tests passed. Without column ranges in code
# objects, tracebacks parse nothing.
export PYTHONNODEBUGRANGES=1
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
