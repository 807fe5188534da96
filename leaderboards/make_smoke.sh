#!/usr/bin/env bash
# Regenerate the committed smoke leaderboard (leaderboards/smoke/) from real runs on this machine.
#
#   bash leaderboards/make_smoke.sh
#
# Runs the smoke preset's sweep, `harness sweep --preset smoke` (harness/presets/smoke.yaml,
# `sweep:`): SmolLM2-135M-Instruct (embedded offline copy), defences none, repnoise, vaccine and
# gradient_ascent x harmfulqa attack lr 3e-5, 8e-5, 2e-4 x seeds 0, 1, 2 = 36 cells, keyword scorer
# plus the answer loss; records into results/smoke/, defended checkpoints in results/smoke/checkpoints/.
# Then `harness leaderboard results/smoke --out leaderboards/smoke --format md,csv,html,tex`.
#
# The sweep resumes: a rerun skips every finished stage and cell (delete results/smoke/ to start
# over), so an interrupted run is continued by running the script again. A cell that fails is
# recorded and shown as failed in the tables; the script still builds the leaderboard and exits 1.
# On a machine without a CUDA GPU the sweep runs with `--isolate reuse` (a warm worker per CPU:
# the torch import and model load are paid once per worker, not once per stage).
#
# Expected time on 2 CPU cores: 40 min to an hour from scratch (9 defence trainings, 12 pre-attack
# evaluations, 36 attacked cells; measured: 37.7 min wall with --isolate reuse on this project's
# 2-core machine, benchmarks/results/smoke_grid.txt; the preset's own estimate is about an hour).
# A rerun with everything finished takes seconds. The dry run's "expected makespan" is the GPU
# cost model's figure, not a CPU time.
#
# Settings (environment variables):
#   RESULTS=results/smoke  OUT=leaderboards/smoke
#   HARNESS=...          the harness command (default: .venv/bin/harness if present, else harness)
#   PYTHON=...           its Python (default: the one next to HARNESS), used to tell whether CUDA is there
#   ISOLATE=auto         the sweep's --isolate: auto (reuse without CUDA, else the sweep's default),
#                        process, reuse
#   CLEAN_CHECKPOINTS=1  delete the defended checkpoints and caches (RESULTS/checkpoints) at the end
#   EXTRA="..."          more `harness sweep` arguments, e.g. EXTRA="--set eval.samples=16"
#   DRY_RUN=1            only print the sweep's plan (`harness sweep --preset smoke --dry-run`), no leaderboard
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=${RESULTS:-results/smoke}
OUT=${OUT:-leaderboards/smoke}
EXTRA=${EXTRA:-}
ISOLATE=${ISOLATE:-auto}
if [ -z "${HARNESS:-}" ]; then
  if [ -x .venv/bin/harness ]; then HARNESS=.venv/bin/harness; else HARNESS=harness; fi
fi
command -v "$HARNESS" >/dev/null 2>&1 || { echo "error: harness command $HARNESS not found (set HARNESS=...)" >&2; exit 2; }
PYTHON=${PYTHON:-$(dirname "$(command -v "$HARNESS")")/python}
[ -x "$PYTHON" ] || PYTHON=python

isolate_args=()
case "$ISOLATE" in
  auto)
    device=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
    if [ "$device" = cpu ]; then isolate_args=(--isolate reuse); fi
    echo "device: ${device:-unknown (torch not importable with $PYTHON)}; isolate: ${isolate_args[1]:-default}" ;;
  process|reuse) isolate_args=(--isolate "$ISOLATE") ;;
  *) echo "error: ISOLATE=$ISOLATE: choose auto, process or reuse" >&2; exit 2 ;;
esac

progress_args=()
[ -t 1 ] || progress_args=(--no-progress)  # the live progress line only on a terminal
start=$(date +%s)
# shellcheck disable=SC2086
sweep=("$HARNESS" sweep --preset smoke --output "$RESULTS" "${isolate_args[@]}" "${progress_args[@]}" $EXTRA)
if [ -n "${DRY_RUN:-}" ]; then
  echo "+ ${sweep[*]} --dry-run"
  "${sweep[@]}" --dry-run
  exit $?
fi
echo "+ ${sweep[*]}"
"${sweep[@]}"
sweep_status=$?
if [ "$sweep_status" -ne 0 ] && [ "$sweep_status" -ne 1 ]; then
  echo "error: the sweep stopped with exit code $sweep_status; no leaderboard built (run the script again to resume)" >&2
  exit "$sweep_status"
fi
"$HARNESS" leaderboard "$RESULTS" --out "$OUT" --format md,csv,html,tex --title "Smoke leaderboard (SmolLM2-135M, CPU)"
status=$?
[ "${CLEAN_CHECKPOINTS:-0}" = 1 ] && rm -rf "$RESULTS/checkpoints"
echo "done in $(( $(date +%s) - start )) s; leaderboard in $OUT"
if [ "$sweep_status" -ne 0 ]; then
  echo "the sweep has cells that are not finished (recorded, shown in the tables); run the script again to retry them" >&2
  exit 1
fi
exit $status
