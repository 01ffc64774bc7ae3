#!/usr/bin/env bash
# The storage regimes table: torch, dali (files; dali-wds: its webdataset reader over the shards),
# ffcv, wds, litdata, mosaic x (warm, cold, s3 at 0, 10 and 50 ms first-byte latency), loader only and end to end
# (small CNN, no evaluation), default generated set, one epoch (1,600 images: a cold run reads the
# whole split once), batch 32, 2 workers / threads, 5 warm-up steps. Fresh `bench run` processes;
# the order of the variants is reversed on even trials. One moto server serves every s3 run (the
# data uploaded once, as a real bucket holds it); each run puts its own shaper in front of it.
# Then `bench report` renders it (about 50 minutes for 2 trials on the 2-core box before litdata and
# mosaic were added: expect about 70).
#   [ONLY="torch wds ..."] bash scripts/measure-regimes.sh [OUT] [TRIALS] [REPO]   (REPO: a checkout to measure)
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
OUT=$(mkdir -p "${1:-reports/regimes-cpu}" && cd "${1:-reports/regimes-cpu}" && pwd); TRIALS=${2:-2}
REPO=$(cd "${3:-.}" && pwd)
if compgen -G "$OUT/runs/*.json" > /dev/null; then  # the table reads every run there: it would mix them
  echo "$OUT/runs holds an earlier measurement's runs: remove them (git rm -r) or choose another OUT" >&2; exit 2
fi
PY="$HERE/.venv/bin/python"
DATA=$("$PY" -c "from bench.data.synth import default_dataset; print(default_dataset())")
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export AWS_ACCESS_KEY_ID=loaderbench AWS_SECRET_ACCESS_KEY=loaderbench AWS_DEFAULT_REGION=us-east-1
"$PY" -m moto.server -H 127.0.0.1 -p "$PORT" > /dev/null 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true' EXIT
until curl -s "http://127.0.0.1:$PORT/moto-api/" > /dev/null; do sleep 0.2; done
"$PY" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$PORT').create_bucket(Bucket='loaderbench')"
# variant -> loader and options (dali-wds: DALI's webdataset reader over the wds shards)
declare -A OPT=([torch]="--loader torch -o num_workers=2" [dali]="--loader dali -o num_threads=2"
                [dali-wds]="--loader dali -o num_threads=2 -o reader=wds" [ffcv]="--loader ffcv -o num_workers=2"
                [wds]="--loader wds -o num_workers=2" [litdata]="--loader litdata -o num_workers=2"
                [mosaic]="--loader mosaic -o num_workers=2"
                [litdata-chunks]="--loader litdata -o num_workers=2 -o order=chunks"
                [mosaic-chunks]="--loader mosaic -o num_workers=2 -o order=chunks")
VARIANTS=${ONLY:-torch dali dali-wds ffcv wds litdata mosaic}  # ONLY="torch wds litdata": a subset
REGIMES=("--storage warm" "--storage cold" "--storage s3 --s3-latency-ms 0" "--storage s3 --s3-latency-ms 10"
         "--storage s3 --s3-latency-ms 50")
for t in $(seq "$TRIALS"); do
  order=($VARIANTS); (( t % 2 )) || order=($(printf '%s\n' $VARIANTS | tac))
  for regime in "${REGIMES[@]}"; do
    extra=""; [[ $regime == *s3* ]] && extra="--s3-endpoint http://127.0.0.1:$PORT"
    for name in "${order[@]}"; do
      for mode in "--loader-only" "--model small --no-eval"; do
        echo "trial $t: $name $regime $mode" >&2
        # a failed run is a missing trial in the table (its error is in failures.log), not the end
        (cd "$REPO" && PYTHONPATH="$REPO" "$PY" -m bench.cli run ${OPT[$name]} --label "$name" --data "$DATA" \
          $regime $extra $mode --batch-size 32 --epochs 1 --warmup-steps 5 --out "$OUT/runs" > /dev/null 2> "$OUT/.stderr") \
          || { echo "trial $t: $name $regime $mode failed:"; tail -n 5 "$OUT/.stderr"; } >> "$OUT/failures.log"
      done
    done
  done
done
rm -f "$OUT/.stderr"
"$PY" -m bench.cli report "$OUT" --title "Storage regimes on the 2-core CPU box" \
  --command "${ONLY:+ONLY=\"$ONLY\" }bash scripts/measure-regimes.sh $* (each run: bench run --loader NAME -o num_workers|num_threads=2 --storage ... --batch-size 32 --epochs 1 --warmup-steps 5)"
