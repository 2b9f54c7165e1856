# Shared by the recipes' cpu_journey.sh scripts (sourced, not run): each step prints its command and its wall time.
# RECIPE_DRY_RUN=1 prints each command (shell-quoted, one per line on stdout) instead of running it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root: the commands below use paths relative to it

step() {
  if [[ -n "${RECIPE_DRY_RUN:-}" ]]; then
    printf '%q ' "$@"; echo
    [[ -t 0 ]] || cat > /dev/null   # a step fed by a pipe: take its input, as the real command would
    return
  fi
  local start end
  start=$(date +%s.%N)
  echo "[recipe] \$ $*" >&2
  "$@"
  end=$(date +%s.%N)
  awk -v s="$start" -v e="$end" 'BEGIN { printf "[recipe] %.1f s\n", e - s }' >&2
}

# serve_in_background CMD...: start a server (its pid in $SERVER, stopped with SIGTERM when the script exits);
# with RECIPE_DRY_RUN=1, print its command like step does.
serve_in_background() {
  if [[ -n "${RECIPE_DRY_RUN:-}" ]]; then
    printf '%q ' "$@"; echo
    return
  fi
  echo "[recipe] \$ $* &" >&2
  "$@" & SERVER=$!
  trap '[[ -n "${SERVER:-}" ]] && kill -TERM "$SERVER" 2>/dev/null; true' EXIT
}

# stop_server: SIGTERM, and the server's own exit status (0: it drained and stopped cleanly)
stop_server() {
  [[ -n "${RECIPE_DRY_RUN:-}" ]] && return
  kill -TERM "$SERVER"
  local status=0
  wait "$SERVER" || status=$?
  SERVER=
  echo "[recipe] server exited with $status" >&2
  return "$status"
}
