#!/usr/bin/env bash
# The whole pipeline: preprocess -> train -> evaluate -> search.
#
#   ./run.sh --demo                  offline: synthetic shapes, small untrained towers (minutes on a laptop CPU)
#   ./run.sh --download [FLAGS]      fetch Flickr8K, then train with train.py's defaults plus FLAGS
#   ./run.sh --source DIR [FLAGS]    Flickr8K archives or folders already on disk (e.g. ../shared/flickr8k)
#
# FLAGS pass through to train.py, e.g. ./run.sh --download --epochs 5 --batch_size 64.
# Running it again is safe: preprocessing skips finished work and training resumes from last.pt.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
mode=$1
shift

case "$mode" in
  --demo)
    DATA=data/demo MODELS=models/demo RESULTS=results/demo
    QUERY="a small red circle above a large blue square"
    "$PY" preprocess_flickr8k.py --demo --data_dir "$DATA" --cache_size 128
    # Untrained towers, 128 px photos and a 2-layer DistilBERT with a vocabulary built from
    # the demo's training captions: nothing to download, a few minutes on a laptop CPU.
    TRAIN=(--no_pretrained --text_encoder "$DATA/text_encoder" --image_size 128 --epochs 10
           --batch_size 32 --lr 2e-3 --head_lr 2e-3 --warmup_steps 50 --save_every 5)
    ;;
  --download|--source)
    DATA=data/flickr8k MODELS=models RESULTS=results
    QUERY="a dog running through snow"
    if [ "$mode" = --download ]; then
      "$PY" preprocess_flickr8k.py --download --data_dir "$DATA"
    else
      [ $# -ge 1 ] || usage
      "$PY" preprocess_flickr8k.py --source "$1" --data_dir "$DATA"
      shift
    fi
    TRAIN=()
    ;;
  -h|--help) usage ;;
  *) echo "unknown mode: $mode" >&2; usage ;;
esac

RESUME=()
[ -f "$MODELS/last.pt" ] && RESUME=(--resume)
# ${A[@]+"${A[@]}"}: an empty array under `set -u` is an error in macOS's bash 3.2.
"$PY" train.py --data_dir "$DATA" --model_dir "$MODELS" ${TRAIN[@]+"${TRAIN[@]}"} "$@" ${RESUME[@]+"${RESUME[@]}"}

# Report on the test split when its photos are there (a copy may withhold them), else on val.
SPLIT=test
grep -Eq $',test\r?$' "$DATA/captions.csv" || SPLIT=val  # rows may end in CRLF (csv module)
mkdir -p "$RESULTS"
"$PY" evaluate.py --checkpoint "$MODELS/best.pt" --split "$SPLIT" --output_json "$RESULTS/${SPLIT}_metrics.json"
"$PY" search.py --checkpoint "$MODELS/best.pt" --query "$QUERY" --output_dir "$RESULTS"
