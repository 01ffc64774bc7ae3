#!/usr/bin/env bash
# The harness's images/s against (1) an outside clock on the same run (scripts/same-run-timing.py,
# loader only and end to end) and (2) a plain perf_counter timing of the same loader (scripts/outside-timing.py):
# `bench run --loader-only` and the plain script alternate (and swap order every trial), fresh processes, TRIALS pairs per backend,
# default generated set, batch 64, 2 workers / threads, 5 warm-up steps, 40 steps (the run stops
# inside its second epoch, where an iterator torn down inside the window would show).
#   bash scripts/measure-harness.sh [OUT] [TRIALS] [REPO]   (REPO: another checkout to measure, e.g. an older commit)
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
OUT=${1:-reports/harness-timing}; TRIALS=${2:-5}; REPO=$(cd "${3:-.}" && pwd)
PY="$HERE/.venv/bin/python"
mkdir -p "$OUT"
DATA=$("$PY" -c "from bench.data.synth import default_dataset; print(default_dataset())")
STEPS=40; WARMUP=5
declare -A OPTS=([torch]='{"num_workers": 2}' [dali]='{"num_threads": 2}' [ffcv]='{"num_workers": 2}'
                 [wds]='{"num_workers": 2}' [synthetic]='{}')
echo "| trial | backend | bench run --loader-only (img/s) | plain script (img/s) | ratio |" > "$OUT/pairs.md"
echo "|---|---|---|---|---|" >> "$OUT/pairs.md"
for t in $(seq "$TRIALS"); do
  for name in torch dali ffcv wds synthetic; do
    args=(); for kv in $("$PY" -c "import json,sys; print(' '.join(f'{k}={v}' for k,v in json.loads(sys.argv[1]).items()))" "${OPTS[$name]}"); do args+=(-o "$kv"); done
    runs="$OUT/runs/$name-$t"
    # a process that fails (or aborts at exit) is a row that says so, not the end of the measurement;
    # odd trials run the harness first, even trials the plain script first (the second process of a
    # pair can meet the first one's exit on these 2 cores)
    harness() {
      (cd "$REPO" && PYTHONPATH="$REPO" "$PY" -m bench.cli run --loader-only --loader "$name" --data "$DATA" \
         --steps $STEPS --warmup-steps $WARMUP --batch-size 64 "${args[@]}" --out "$HERE/$runs" > /dev/null) || true
      h=$("$PY" -c "import json,glob,sys; print(json.load(open(glob.glob(sys.argv[1]+'/*.json')[0]))['metrics']['images_per_second'])" "$runs" 2>/dev/null || echo nan)
    }
    plain() {
      o=$(cd "$REPO" && PYTHONPATH="$REPO" "$PY" "$HERE/scripts/outside-timing.py" "$name" "$DATA" $STEPS $WARMUP "${OPTS[$name]}" 2>/dev/null | tail -1 \
          | "$PY" -c "import json,sys; print(json.load(sys.stdin)['images_per_second'])" 2>/dev/null || echo nan)
    }
    if (( t % 2 )); then harness; plain; else plain; harness; fi
    "$PY" -c "import sys; t,n,h,o=sys.argv[1:]; h,o=float(h),float(o); print(f'| {t} | {n} | {h:,.1f} | {o:,.1f} | {h/o:.3f} |')" "$t" "$name" "$h" "$o" | tee -a "$OUT/pairs.md"
  done
done
echo "| backend | mode | harness / outside clock, same run |" > "$OUT/same-run.md"
echo "|---|---|---|" >> "$OUT/same-run.md"
for name in torch dali ffcv wds; do
  for mode in lo e2e; do
    r=$(cd "$REPO" && PYTHONPATH="$REPO" "$PY" "$HERE/scripts/same-run-timing.py" "$name" $mode "$DATA" "$(mktemp -d)" 2>/dev/null | tail -1 | sed 's/.*ratio=//')
    echo "| $name | $([ $mode = lo ] && echo loader-only || echo end-to-end) | ${r:-failed} |" | tee -a "$OUT/same-run.md"
  done
done
"$PY" - "$OUT/pairs.md" <<'PY' | tee "$OUT/summary.md"
import collections, statistics, sys
rows = [l.split("|")[1:-1] for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| trial")]
by = collections.defaultdict(list)
for r in rows:
    if r[4].strip() != "nan":
        by[r[1].strip()].append(float(r[4]))
print("| backend | median ratio harness / plain | min - max | pairs |\n|---|---|---|---|")
for k, v in by.items():
    print(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} - {max(v):.3f} | {len(v)} |")
PY
