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
