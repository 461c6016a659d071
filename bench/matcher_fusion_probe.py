"""Does the matcher know anything the cosine does not? Logistic fits on the top-K (issue 12).

For each held-out query (both ways) the dual encoder's top K candidates are scored by the
matcher; a logistic regression "is this candidate the true one?" is fitted on the val split's
candidates from the matcher's raw logit, from the cosine, and from both, and the test split's
top K are reordered by each fit. If the matcher carried information the cosine lacks, the fit on
both would weigh the logit and reorder the test top K to a higher R@1 than the cosine's order.

    python bench/matcher_fusion_probe.py CHECKPOINT VAL.jsonl TEST.jsonl [--rerank 16]

(CHECKPOINT: one with a matcher, e.g. the itm stage of ``demo/train_model.py --itm``; VAL / TEST:
the recipe's manifests, e.g. .cache/demo-train/val.jsonl.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from beit3 import load_checkpoint  # noqa: E402
from beit3.data import read_pairs  # noqa: E402
from training.matching import (  # noqa: E402
    _eval_mode,
    _score_pairs,
    encode_held_out,
    expected_calibration_error,
)

FEATURES = {"logit": (0,), "cosine": (1,), "both": (0, 1)}


def top_candidates(ckpt, manifest: str, k: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per direction: (raw logits (Q, K), cosines (Q, K), is-true (Q, K)) of each query's top K."""
    model = ckpt.model
    out = {}
    with _eval_mode(model), torch.no_grad():
        enc = encode_held_out(model, ckpt.tokenizer, ckpt.preprocess, read_pairs(manifest), 64)
        true = torch.zeros_like(enc.sims, dtype=torch.bool)
        true[enc.owner, torch.arange(len(enc.texts))] = True
        for direction, sims, truth in (("i2t", enc.sims, true), ("t2i", enc.sims.T, true.T)):
            top = sims.topk(min(k, sims.shape[1]), dim=1).indices
            queries = torch.arange(sims.shape[0]).unsqueeze(1).expand_as(top)
            pairs = torch.stack([queries, top] if direction == "i2t" else [top, queries], -1)
            logits = _score_pairs(
                model, enc.pixels, enc.ids, enc.mask, pairs.reshape(-1, 2), 64
            ).reshape(top.shape)
            out[direction] = (logits, sims.gather(1, top), truth.gather(1, top))
    return out


def design(cands: dict, columns: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for logits, cosines, hits in cands.values():
        feats = (logits, cosines)
        xs.append(torch.stack([feats[c].reshape(-1) for c in columns], 1))
        ys.append(hits.reshape(-1).float())
    return torch.cat(xs).double(), torch.cat(ys).double()


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weights (one per column) then bias, minimising the binary cross-entropy (LBFGS)."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def recall(cands: dict, key) -> dict[str, list[float]]:
    """R@1/5/10 (percent) when each query's top K is ordered by ``key(logits, cosines)``; a true
    item outside the top K counts as a miss."""
    out = {}
    for direction, (logits, cosines, hits) in cands.items():
        order = torch.sort(key(logits, cosines), dim=1, descending=True, stable=True).indices
        ordered = hits.gather(1, order)
        first = torch.where(ordered.any(1), ordered.float().argmax(1), ordered.shape[1])
        out[direction] = [round(100 * float((first < k).float().mean()), 1) for k in (1, 5, 10)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("val")
    parser.add_argument("test")
    parser.add_argument("--rerank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    if not getattr(ckpt.model, "has_matcher", False):
        raise SystemExit(f"error: {args.checkpoint}: no matcher: fine-tune it with --itm")
    val = top_candidates(ckpt, args.val, args.rerank)
    test = top_candidates(ckpt, args.test, args.rerank)
    scale = float(ckpt.model.itm_calibration[0])
    rows = {
        "cosine order (the dual encoder)": (
            None,
            recall(val, lambda lg, c: c),
            recall(test, lambda lg, c: c),
        ),
        "stored calibration's order (the matcher)": (
            None,
            recall(val, lambda lg, c: scale * lg),
            recall(test, lambda lg, c: scale * lg),
        ),
    }
    for name, columns in FEATURES.items():
        x, y = design(val, columns)
        w = fit_logistic(x, y)
        xt, yt = design(test, columns)
        ece = expected_calibration_error(torch.sigmoid(xt @ w[:-1] + w[-1]).float(), yt.float())
        weights = dict(zip(("logit", "cosine"), [0.0, 0.0], strict=True))
        for c, value in zip(columns, w[:-1].tolist(), strict=True):
            weights[("logit", "cosine")[c]] = value

        def key(lg, c, wl=weights["logit"], wc=weights["cosine"]):
            return wl * lg.double() + wc * c.double()

        rows[f"fit on val: {name}"] = (
            {**{k: round(v, 3) for k, v in weights.items()}, "test_ece": round(ece, 3)},
            recall(val, key),
            recall(test, key),
        )
    print(f"# top {args.rerank} of each query, R@1/5/10 i2t | t2i (val | test)")
    for name, (fit, v, t) in rows.items():
        print(f"{name:44s} val {v['i2t']} | {v['t2i']}   test {t['i2t']} | {t['t2i']}")
        if fit:
            print(f"{'':44s} {json.dumps(fit)}")


if __name__ == "__main__":
    main()
