#!/usr/bin/env bash
# Each backend against the per-core limit of the CPU image pipeline (issue 17's table): the limit
# micro-benchmark (scripts/decode-limit.py), then every installed backend loader-only and end to end
# (small CNN, no evaluation) under `bench run --cpus K --workers K` for K = 1, 2, in fresh processes,
# the backends' order reversed on even trials; `synthetic` end to end is the model's ceiling.
# BEFORE=<commit> adds the torch backend of that commit (a git worktree) as "torch-before".
# scripts/limit-table.py writes OUT/README.md. About 25 minutes for 3 trials on the 2-core box.
#   [BEFORE=b8661cf] [ONLY="torch wds ..."] bash scripts/measure-limit.sh [OUT] [TRIALS]   (ONLY: a subset)
# A name NAME+KEY=VALUE in ONLY is backend NAME with `-o KEY=VALUE` (e.g. litdata+order=chunks).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-reports/limit-cpu}" && cd "${1:-reports/limit-cpu}" && pwd); TRIALS=${2:-3}
PY="$PWD/.venv/bin/python"
if compgen -G "$OUT/runs/*.json" > /dev/null; then  # the table reads every run there: it would mix them
  echo "$OUT/runs holds an earlier measurement's runs: remove them (git rm -r) or choose another OUT" >&2; exit 2
fi
DATA=$("$PY" -c "from bench.data.synth import default_dataset; print(default_dataset())")
LOADERS=${ONLY:-$("$PY" -c "from loaders import backends; print(' '.join(b.name for b in backends() if b.installed and not b.is_ceiling))")}
if [ -n "${BEFORE:-}" ]; then
  rm -rf /tmp/limit-before && git worktree add -f --detach /tmp/limit-before "$BEFORE" >/dev/null 2>&1
  LOADERS="$LOADERS torch-before"
fi
"$PY" scripts/decode-limit.py --data "$DATA/train" --trials "$TRIALS" --out "$OUT" 2> "$OUT/decode-limit.log"
SHAPE="--batch-size 64 --image-size 224 --steps 30 --warmup-steps 5 --no-eval"
run() {  # run NAME K MODE-ARGS...
  local name=$1 k=$2; shift 2
  local loader=${name%%+*} dir=$PWD opt=()
  [[ $name == *+* ]] && opt=(-o "${name#*+}")
  [ "$name" = torch-before ] && { loader=torch; dir=/tmp/limit-before; }
  (cd "$dir" && "$PY" -m bench.cli run --data "$DATA" --loader "$loader" "${opt[@]}" --cpus "$k" --workers "$k" $SHAPE "$@" \
      --label "$name" --out "$OUT/runs" > /dev/null 2> "$OUT/.stderr") \
    || { echo "$name --cpus $k $*: failed:"; tail -n 5 "$OUT/.stderr"; } >> "$OUT/failures.log"
}
for t in $(seq "$TRIALS"); do
  order=($LOADERS); (( t % 2 )) || order=($(printf '%s\n' $LOADERS | tac))
  for k in 1 2; do
    echo "trial $t, $k core(s)" >&2
    for name in "${order[@]}"; do
      run "$name" "$k" --loader-only
      run "$name" "$k" --model small
    done
    (cd "$PWD" && "$PY" -m bench.cli run --data "$DATA" --loader synthetic --cpus "$k" $SHAPE --model small \
       --label synthetic --out "$OUT/runs" > /dev/null 2> "$OUT/.stderr") || tail -n 5 "$OUT/.stderr" >> "$OUT/failures.log"
  done
done
rm -f "$OUT/.stderr"
[ -n "${BEFORE:-}" ] && git worktree remove --force /tmp/limit-before
"$PY" scripts/limit-table.py "$OUT" "${BEFORE:+BEFORE=$BEFORE }${ONLY:+ONLY=\"$ONLY\" }bash scripts/measure-limit.sh $*"
