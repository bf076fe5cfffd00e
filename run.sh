#!/usr/bin/env bash
# The whole pipeline: preprocess -> train -> evaluate -> search.
#
#   ./run.sh [FLAGS]                 Flickr8K already under data/: Flickr8k_Dataset.zip and
#                                    Flickr8k_text.zip, their extracted folders, or a prepared data/flickr8k
#   ./run.sh --download [FLAGS]      fetch Flickr8K (about 1 GB) first
#   ./run.sh --source DIR [FLAGS]    Flickr8K archives or folders in DIR
#   ./run.sh --demo                  offline: synthetic shapes, small untrained towers (minutes on a laptop CPU)
#
# FLAGS pass through to train.py, e.g. ./run.sh --epochs 5 --batch_size 64.
# Running it again is safe: preprocessing skips finished work and training resumes from last.pt.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "$1"; }
mode=${1:-}
case "$mode" in --demo|--download|--source) shift ;; -h|--help) usage 0 ;; esac
DATA=data/flickr8k MODELS=models RESULTS=results QUERY="a dog running through snow" TRAIN=()

case "$mode" in
  --demo)
    DATA=data/demo MODELS=models/demo RESULTS=results/demo
    QUERY="a small red circle above a large blue square"
    "$PY" preprocess_flickr8k.py --demo --data_dir "$DATA" --cache_size 128
    # Untrained towers, 128 px photos and a 2-layer DistilBERT with a vocabulary built from
    # the demo's training captions: nothing to download, a few minutes on a laptop CPU.
    TRAIN=(--no_pretrained --text_encoder "$DATA/text_encoder" --image_size 128 --epochs 10
           --batch_size 32 --lr 2e-3 --head_lr 2e-3 --warmup_steps 50 --save_every 5) ;;
  --download) "$PY" preprocess_flickr8k.py --download --data_dir "$DATA" ;;
  --source)
    [ $# -ge 1 ] || usage 2
    "$PY" preprocess_flickr8k.py --source "$1" --data_dir "$DATA"
    shift ;;
  *)  # on disk: what preprocess_flickr8k.py --source data finds, else a prepared data/flickr8k as is
    if [ -f data/Flickr8k_Dataset.zip ] || [ -f data/Flickr8k_text.zip ] || [ -n "$(find -H data -maxdepth 3 \
         \( -name Flickr8k.token.txt -o -name captions.txt \) 2>/dev/null | head -n 1)" ]; then
      "$PY" preprocess_flickr8k.py --source data --data_dir "$DATA"
    elif [ ! -f "$DATA/captions.csv" ]; then
      echo "error: no Flickr8K under data/; run ./run.sh --download, or ./run.sh --source DIR" \
           "(a folder with Flickr8k_Dataset.zip and Flickr8k_text.zip)" >&2
      exit 2
    fi ;;
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
