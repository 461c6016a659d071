"""What the bundled (or any retrieval) model has learned on the emoji data, in one table.

    python demo/measure_model.py [CHECKPOINT]        # default demo/model; JSON on stdout

- recall@1/5/10 both ways on each split (candidates: that split's images and names), and on the
  train split separately for skin-tone variants, flags and the rest (where it underfits);
- the common-names check of issue 16: each name in tests/fixtures/common_emoji_names.txt as a
  text query against every demo image (what the demo index holds), hit when its own image is
  in the top 5 (rank = number of images scoring strictly higher).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beit3 import load_checkpoint  # noqa: E402
from beit3.data import PairRecord  # noqa: E402
from training.matching import encode_held_out  # noqa: E402
from training.metrics import recall_at_k  # noqa: E402

DATA = ROOT / "demo" / "data" / "emoji"
COMMON_NAMES = ROOT / "tests" / "fixtures" / "common_emoji_names.txt"


def common_names() -> list[str]:
    lines = COMMON_NAMES.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _kind(name: str) -> str:
    if "skin tone" in name:
        return "skin_tone"
    return "flag" if name.startswith("flag: ") else "other"


def _recall(sims: torch.Tensor, rows: list[int]) -> dict[str, float]:
    """Recall within ``rows`` (image i's name is text i): the candidates are those rows only."""
    index = torch.tensor(rows)
    block = sims[index][:, index]
    metrics = recall_at_k(block, torch.arange(len(rows)))
    return {k: round(v * 100, 1) for k, v in metrics.items()} | {"n": len(rows)}


@torch.no_grad()
def measure(checkpoint: str | Path, batch_size: int = 256) -> dict:
    ckpt = load_checkpoint(checkpoint, device="cpu")
    model = ckpt.model.eval()
    rows = [json.loads(line) for line in (DATA / "captions.jsonl").read_text().splitlines()]
    records = [PairRecord(str(DATA / r["image"]), r["text"], str(i)) for i, r in enumerate(rows)]
    enc = encode_held_out(model, ckpt.tokenizer, ckpt.preprocess, records, batch_size)
    # Pixel-identical files are one image here (as in the index): map each row to its image.
    image_of = {path: i for i, path in enumerate(enc.images)}
    text_of = {text: i for i, text in enumerate(enc.texts)}
    sims = enc.sims[[image_of[str(DATA / r["image"])] for r in rows]][
        :, [text_of[r["text"]] for r in rows]
    ]  # (rows, rows): image of row i vs name of row j
    out: dict = {"checkpoint": str(checkpoint), "model_id": ckpt.model_id, "splits": {}}
    for split in ("train", "val", "test"):
        out["splits"][split] = _recall(sims, [i for i, r in enumerate(rows) if r["split"] == split])
    for kind in ("skin_tone", "flag", "other"):
        chosen = [
            i for i, r in enumerate(rows) if r["split"] == "train" and _kind(r["text"]) == kind
        ]
        out["splits"][f"train_{kind}"] = _recall(sims, chosen)
    # Common names against every demo image (duplicates collapsed: one column per image file).
    image_sims = enc.sims  # (unique images, unique texts)
    by_name = {r["text"]: image_of[str(DATA / r["image"])] for r in rows}
    ranks = {}
    for name in common_names():
        scores = image_sims[:, text_of[name]]
        ranks[name] = int((scores > scores[by_name[name]]).sum())
    hits = sum(rank < 5 for rank in ranks.values())
    out["common_names"] = {
        "top5": hits,
        "total": len(ranks),
        "fraction": round(hits / len(ranks), 3),
        "misses": {name: rank + 1 for name, rank in ranks.items() if rank >= 5},
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=str(ROOT / "demo" / "model"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(json.dumps(measure(args.checkpoint), indent=2))


if __name__ == "__main__":
    main()
