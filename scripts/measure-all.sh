#!/usr/bin/env bash
# Every CPU figure of README.md and docs/ again, on the current code, into a new folder ROOT (nothing
# committed is overwritten; compare, then move the folders you keep over reports/<name>):
#   bash scripts/measure-all.sh ROOT [--with-regimes]      (ONLY=REGEX: only the folders it matches)
# Trial counts are cut to fit about an hour on a 2-core box. Estimated minutes per script, from the
# timestamps of the committed results scaled to these trial counts: foundation 8, dali 3, ffcv 7,
# wds 4, ladder + tune + doctor 10, limit 7, plan 4, sharding 4, harness 6, resume 5 (timed in this
# chain at 2 trials: 9 min, 2026-12-02), ray 8 (3 trials took 11.5 min alone, 2026-12-05): about 66. --with-regimes adds the storage regimes at 1
# trial (about 28 more). Only the resume step has been timed as part of the chain so far.
# Each script's wall time goes to ROOT/durations.md; every folder gets its index.html; then
# `bench report --check ROOT` says which folders are current.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:?usage: bash scripts/measure-all.sh ROOT [--with-regimes]}
[ -e "$ROOT" ] && { echo "measure-all: $ROOT exists; results are never overwritten: choose a new ROOT" >&2; exit 2; }
mkdir -p "$ROOT"
steps=(
  "foundation-cpu|bash scripts/measure-foundation.sh $ROOT/foundation-cpu 2"
  "dali-cpu|bash scripts/measure-dali.sh $ROOT/dali-cpu 2"
  "ffcv-cpu|bash scripts/measure-ffcv.sh $ROOT/ffcv-cpu 2"
  "wds-cpu|bash scripts/measure-wds.sh $ROOT/wds-cpu 2"
  "ladder-cpu|bash scripts/measure-ladder.sh $ROOT/ladder-cpu $ROOT/doctor-cpu"
  "limit-cpu|bash scripts/measure-limit.sh $ROOT/limit-cpu 2"
  "plan-cpu|bash scripts/measure-plan.sh $ROOT/plan-cpu 1"
  "sharding-cpu|bash scripts/measure-sharding.sh $ROOT/sharding-cpu resnet50 1"
  "resume-cpu|bash scripts/measure-resume.sh $ROOT/resume-cpu 1"
  "harness-timing|bash scripts/measure-harness.sh $ROOT/harness-timing 2"
  "ray-cpu|bash scripts/measure-ray.sh $ROOT/ray-cpu 2"
)
[ "${2:-}" = "--with-regimes" ] && steps+=("regimes-cpu|bash scripts/measure-regimes.sh $ROOT/regimes-cpu 1")
echo "| script | minutes | exit |" > "$ROOT/durations.md"; echo "|---|---|---|" >> "$ROOT/durations.md"
failed=0
for step in "${steps[@]}"; do
  name=${step%%|*}; cmd=${step#*|}
  [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]] && continue
  echo "measure-all: $name: $cmd" >&2
  start=$(date +%s); rc=0
  $cmd > "$ROOT/$name.log" 2>&1 || rc=$?
  echo "| $cmd | $(( ($(date +%s) - start + 30) / 60 )) | $rc |" | tee -a "$ROOT/durations.md"
  [ $rc = 0 ] || failed=1
  [ -f "$ROOT/$name/README.md" ] && .venv/bin/bench report "$ROOT/$name" --html > /dev/null || true
done
.venv/bin/bench report --check "$ROOT" || true
exit $failed
