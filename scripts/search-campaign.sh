#!/usr/bin/env bash
# An equal-budget search campaign over the five optimizers of the paper's comparison:
#
#   scripts/search-campaign.sh TASK TRIALS OUT [FLAG ...]
#
# TASK is autoencoder or tagger; every `precond search TASK` gets `--trials t --out OUT/<name>`
# plus the FLAGs (e.g. --epochs 30). Round t brings every optimizer's search to t trials, so
# whenever the campaign stops, the optimizers have equal budgets (give or take the round in
# progress; run the same command again to finish it: searches resume). The five searches of a
# round run two at a time with one thread each (JOBS and THREADS change that), which on a 2-core
# machine does ~1.6x the trials per hour of one two-thread run at a time. Each search's output
# goes to OUT/log-<name>-<t>.txt. Builds the command line first (dev profile, as the README's
# commands). Not part of CI.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 {autoencoder|tagger} TRIALS OUT [FLAG ...]" >&2
  exit 2
fi
task=$1
trials=$2
out=$3
shift 3
case $task in autoencoder | tagger) ;; *)
  echo "unknown task $task (autoencoder or tagger)" >&2
  exit 2
  ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build -p lab --bin precond
precond="$root/target/debug/precond"
mkdir -p "$out"
export RAYON_NUM_THREADS="${THREADS:-1}"
# The slowest first, so the two lanes end a round close together.
optimizers="shared-basis sketchy block-adam shampoo-1000 adam"
for t in $(seq 1 "$trials"); do
  echo "== round $t of $trials $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086 # one name per line
  printf '%s\n' $optimizers | PRECOND="$precond" TASK="$task" T="$t" OUT="$out" xargs -P "${JOBS:-2}" -I{} \
    bash -c 'if "$PRECOND" search "$TASK" --optimizer {} --trials "$T" --out "$OUT/{}" "$@" \
               > "$OUT/log-{}-$T.txt" 2>&1; then echo "   {} ($(date -u +%T))";
             else echo "   {} FAILED, see $OUT/log-{}-$T.txt" >&2; exit 255; fi' _ "$@"
done
for name in $optimizers; do
  echo "$out/$name/summary.md"
done
