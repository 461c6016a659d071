#!/usr/bin/env bash
# A peer benchmark you can run: open_clip (its own trainer, from scratch) against `beit3 finetune`
# (from demo/model, and the demo architecture from scratch) at the same wall-clock budget each,
# on a held-out domain no stage of the demo recipe sees (Tux Paint stamps: bench/peer/build_domain.py),
# scored by one scorer (bench/peer/score.py).
#
#   bench/peer_openclip.sh [BUDGET_MINUTES]      # default 20; the three runs take ~3x that
#
# Needs: apt-get install -y --no-install-recommends tuxpaint-stamps-default librsvg2-bin, the
# project venv (.venv), and the network or the local wheel store once, for the peer venv
# (.cache/peer-venv: torch 2.14.1, torchvision 0.29.1, open_clip_torch[training] 3.3.0; never
# installed into .venv, where torchvision breaks torch). The runs go one after another (2 cores).
# Output: .cache/peer-runs/<budget>min/{openclip,beit3-init,beit3-scratch,beit3-zeroshot}/ and
# the table in .cache/peer-runs/<budget>min/results.json.
set -euo pipefail

BUDGET="${1:-20}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PEER_VENV="${PEER_VENV:-.cache/peer-venv}"
DOMAIN="${PEER_DOMAIN:-.cache/peer-domain}"
RUNS="${PEER_RUNS:-.cache/peer-runs/${BUDGET}min}"
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
  echo "error: $PY not found: create the project venv first (see README)" >&2
  exit 2
fi
if [ ! -x "$PEER_VENV/bin/python" ] || ! "$PEER_VENV/bin/python" -c "import open_clip_train" 2>/dev/null; then
  echo "== building the peer venv in $PEER_VENV (about 5.8 GB)"
  python3 -m venv "$PEER_VENV"
  "$PEER_VENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 \
    "open_clip_torch[training]==3.3.0" pillow
fi
if [ ! -f "$DOMAIN/test.jsonl" ]; then
  echo "== building the domain in $DOMAIN"
  "$PY" bench/peer/build_domain.py --out "$DOMAIN"
fi

mkdir -p "$RUNS"
echo "== open_clip, ${BUDGET} min"
"$PEER_VENV/bin/python" bench/peer/openclip_train_eval.py \
  --data "$DOMAIN" --out "$RUNS/openclip" --budget-min "$BUDGET"
for variant in init scratch zeroshot; do
  echo "== beit3 $variant, ${BUDGET} min"
  "$PY" bench/peer/beit3_train_eval.py --variant "$variant" \
    --data "$DOMAIN" --out "$RUNS/beit3-$variant" --budget-min "$BUDGET"
done

echo "== test split of $DOMAIN (each distinct caption encoded once)"
"$PY" bench/peer/score.py \
  "$RUNS/openclip/openclip.npz" \
  "$RUNS/beit3-init/beit3.npz" \
  "$RUNS/beit3-scratch/beit3.npz" \
  "$RUNS/beit3-zeroshot/beit3.npz" \
  --json "$RUNS/results.json"
