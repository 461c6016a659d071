"""Text query end to end on CPU: tokenise, encode, search a 100k LanceDB table, fetch metadata.

The model is ``beit3-base`` (random init, seeded: speed does not depend on the weights) with the
demo tokenizer (demo/model/tokenizer; ids are ids, the encoder costs the same), once in fp32 and
once with int8 encoders (beit3.quantize), queried alternately so that load on this shared
machine hits both alike. The table holds --rows synthetic 768-d vectors with bench metadata
(bench/search_speed.py's mixture and rows), built as the indexer builds it: the default
``auto`` table (IVF_FLAT above 20k rows, 32 probes) and, beside it, an ``exact`` one (no ANN
index: the cached exact path of LanceStore.search). The queries are demo emoji names, one at a
time (batch 1, as the app sends them). Stages per query: tokenise (sentencepiece + padding),
encode (encode_text), search (LanceStore.search: ranking and the metadata of the 10 hits, which
it returns), hits (rows to result dicts).

    python bench/query_budget.py                         # ~3 min on 2 cores
    python bench/query_budget.py --rows 20000 --queries 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("LANCE_LOG", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beit3 import create_config  # noqa: E402
from beit3.heads import Beit3ForRetrieval  # noqa: E402
from beit3.quantize import quantize_model  # noqa: E402
from beit3.tokenizer import TextTokenizer  # noqa: E402
from bench.search_speed import fill_lance, mixture  # noqa: E402

STAGES = ("tokenise", "encode", "search", "hits", "total")


def _pct(values: list[float], q: float) -> float:
    ms = sorted(v * 1e3 for v in values)
    return ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="beit3-base")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from indexer.stores.lance_store import LanceStore

    cfg = create_config(args.preset)
    torch.manual_seed(0)
    fp32 = Beit3ForRetrieval(cfg).eval()
    int8 = quantize_model(fp32, "int8")
    tokenizer = TextTokenizer(ROOT / "demo" / "model" / "tokenizer", max_len=64)
    captions = (ROOT / "demo" / "data" / "emoji" / "captions.jsonl").read_text().splitlines()
    names = [json.loads(line)["text"] for line in captions][: args.queries + 5]

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="query-budget-"))
    data = mixture(args.rows, cfg.embed_dim, seed=1)
    stores = {}
    for kind in ("auto", "exact"):
        db = workdir / kind
        shutil.rmtree(db, ignore_errors=True)
        start = time.perf_counter()
        store = LanceStore(db, "t", dim=cfg.embed_dim, create=True, index_type=kind)
        fill_lance(store, data)
        store.commit()  # as beit3 index does: the ANN index of an auto table above 20k rows
        index = "IVF_FLAT" if store.has_vector_index() else "no ANN index"
        print(
            f"# table {kind}: {args.rows:,} rows, {index}, built in {time.perf_counter() - start:.0f} s"
        )
        stores[kind] = store
    del data

    print(
        f"# {args.preset} text encoder, CPU x{torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; {args.queries} queries (demo names), batch 1, top 10"
    )
    print(f"{'encoder':8s} {'table':6s} " + " ".join(f"{s + ' p50/p99 ms':>22s}" for s in STAGES))

    @torch.inference_mode()
    def one(model: Beit3ForRetrieval, store: LanceStore, text: str) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = tokenizer([text])
        t1 = time.perf_counter()
        vector = model.encode_text(batch.text_ids, batch.padding_mask).numpy()[0]
        t2 = time.perf_counter()
        matches = store.search(vector[None], 10)[0]
        t3 = time.perf_counter()
        hits = [{"score": m.score, "id": m.row["sha256"], "path": m.row["path"]} for m in matches]
        t4 = time.perf_counter()
        assert len(hits) == 10, f"{len(hits)} hits"
        return {
            "tokenise": t1 - t0,
            "encode": t2 - t1,
            "search": t3 - t2,
            "hits": t4 - t3,
            "total": t4 - t0,
        }

    models = {"fp32": fp32, "int8": int8}
    for kind, store in stores.items():
        times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STAGES} for m in models}
        for model in models.values():  # warm-up: the first query reads the table
            for text in names[:3]:
                one(model, store, text)
        for text in names[5 : 5 + args.queries]:
            for name, model in models.items():  # alternate: load hits both alike
                for stage, value in one(model, store, text).items():
                    times[name][stage].append(value)
        for name in models:
            cells = [
                f"{statistics.median(x) * 1e3:10.1f} /{_pct(x, 0.99):9.1f}"
                for x in (times[name][s] for s in STAGES)
            ]
            print(f"{name:8s} {kind:6s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)
        fp, q8 = (statistics.median(times[m]["total"]) for m in models)
        print(f"# {kind}: total p50 fp32 / int8 = {fp / q8:.2f}x; goal p50 <= 50 ms")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
