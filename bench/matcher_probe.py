"""Does the fused representation carry image-text agreement? A linear probe (issue 12).

The matcher of ``--itm`` stayed at its prior on the bundled model, with hard negatives and with
near-random ones (itm_temperature 10). This probe asks the question under it: run the joint
(fusion) forward of a checkpoint, frozen, on N training pairs and on the same images with the
next pair's caption (easy negatives), and fit a logistic regression on the pooled vision CLS,
the text ``<s>`` or both. Held-out accuracy near 0.5 means the fused tokens know little about
whether image and text match; the dual encoder's cosine on the same pairs is printed beside it.

    python bench/matcher_probe.py                       # demo/model, 480 pairs, ~30 s on 2 cores
    python bench/matcher_probe.py --model runs/itm/final --pairs data/train.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fused_first_tokens(ckpt, images: torch.Tensor, texts: list[str], batch: int = 48):
    """(N, 2D): the vision CLS and text <s> of the joint forward, concatenated."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            tokens = ckpt.tokenizer(texts[i : i + batch])
            hidden = ckpt.model.beit3(
                images=images[i : i + batch],
                text_ids=tokens.text_ids,
                padding_mask=tokens.padding_mask,
                first_token_only=True,
            ).hidden_states
            out.append(hidden.reshape(hidden.shape[0], -1).float())
    return torch.cat(out)


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (LBFGS) on standardised x."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = x[train] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train])
        loss = loss + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (((x[test] @ w + b) > 0).float() == y[test]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "demo" / "model")
    parser.add_argument("--pairs", type=Path, default=None, help="JSONL of image + text")
    parser.add_argument("--n", type=int, default=480)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from beit3 import load_checkpoint
    from beit3.data import read_pairs
    from beit3.transforms import load_image_tensor

    ckpt = load_checkpoint(args.model, device="cpu")
    ckpt.model.eval()
    if args.pairs is None:
        import json

        rows = [json.loads(line) for line in (REPO / "demo/data/emoji/captions.jsonl").open()]
        pairs = [
            (str(REPO / "demo/data/emoji" / r["image"]), r["text"])
            for r in rows
            if r["split"] == "train"
        ]
    else:
        pairs = [(str(p.image), p.text) for p in read_pairs(args.pairs)]
    random.Random(0).shuffle(pairs)
    pairs = pairs[: args.n]
    images = torch.stack([load_image_tensor(path, ckpt.preprocess) for path, _ in pairs])
    texts = [text for _, text in pairs]
    shifted = texts[1:] + texts[:1]  # each image with the next pair's caption
    pos, neg = fused_first_tokens(ckpt, images, texts), fused_first_tokens(ckpt, images, shifted)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(x))
    train, test = order[:cut], order[cut:]
    half = pos.shape[1] // 2
    print(f"# {ckpt.model_id}: {len(pairs)} pairs + as many shifted captions; chance 0.5")
    for name, cols in (("vision CLS", slice(0, half)), ("text <s>", slice(half, None))):
        print(
            f"fused {name:<11} linear probe, held-out accuracy {probe(x[:, cols], y, train, test):.3f}"
        )
    print(f"fused both        linear probe, held-out accuracy {probe(x, y, train, test):.3f}")
    with torch.inference_mode():
        model = ckpt.retrieval_model
        iv = torch.cat([model.encode_image(images[i : i + 48]) for i in range(0, len(images), 48)])
        tokens = ckpt.tokenizer(texts)
        tv = model.encode_text(tokens.text_ids, tokens.padding_mask)
    beats = ((iv * tv).sum(1) > (iv * torch.roll(tv, -1, 0)).sum(1)).float().mean().item()
    print(f"dual-encoder cosine: own caption above the shifted one for {beats:.3f} of the images")


if __name__ == "__main__":
    main()
