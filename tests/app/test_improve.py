"""The improve loop on a real tiny index: feedback -> fine-tune -> gate -> new version -> active;
resumable stages, the refusal, and the feedback / improve commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.improve import STAGES, ImproveConfig, ImproveRefused, improve
from beit3.errors import ConfigError, InputDataError
from indexer import Searcher, index_images
from indexer.feedback import FeedbackStore
from indexer.versions import list_versions
from tests.data import write_shapes
from tests.training.helpers import write_manifest

runner = CliRunner()
QUERIES = ("a red circle", "a blue square", "a green triangle", "a yellow cross")


@pytest.fixture
def loop_db(tmp_path, tiny_checkpoint):
    """32 shapes images indexed with the tiny model; their pairs as training data, a jittered
    copy of them as the held-out set, and 3 labels for each of 4 queries (the right image
    relevant, the two best wrong hits not)."""
    pairs = write_shapes(tmp_path / "imgs", size=32)
    train = write_manifest(tmp_path / "train.jsonl", pairs)
    jittered = write_shapes(tmp_path / "held", size=32, variants=2)[32:]
    held_out = write_manifest(tmp_path / "held_out.jsonl", jittered)
    db = tmp_path / "db"
    index_images([tmp_path / "imgs"], db, model=tiny_checkpoint, table="images", device="cpu")
    searcher = Searcher(db, device="cpu")
    right = {text: str(path) for path, text in pairs}
    store = FeedbackStore(db)
    for query in QUERIES:
        hits = searcher.search(query, table="images", k=64)
        good = next(h for h in hits if h.path == right[query])
        wrong = [h for h in hits if h.path != right[query]][:2]
        for hit, label in [(good, 1), *((w, -1) for w in wrong)]:
            store.add(
                query_text=query,
                hit_table="images",
                hit_id=hit.id,
                hit_path=hit.path,
                label=label,
                model_id=searcher.model_id,
                version=searcher.tables["images"].version,
            )
    return {"db": db, "train": train, "held_out": held_out, "right": right, "root": tmp_path}


def _mean_rank(db, right):
    searcher = Searcher(db, device="cpu")
    ranks = []
    for query in QUERIES:
        hits = searcher.search(query, table="images", k=64)
        ranks.append(next(h.rank for h in hits if h.path == right[query]))
    return sum(ranks) / len(ranks), searcher.tables["images"]


def _config(loop, **changes):
    base = dict(
        db=str(loop["db"]),
        output_dir=str(loop["root"] / "run"),
        held_out=str(loop["held_out"]),
        train=str(loop["train"]),
        steps=20,
        batch_size=16,
        lr=1e-3,
        feedback_fraction=0.5,
        max_drop=100.0,  # a random tiny model's held-out recall is noise
        device="cpu",
    )
    return ImproveConfig(**{**base, **changes})


def test_loop_trains_on_feedback_and_serves_a_new_version(loop_db):
    before_rank, before_table = _mean_rank(loop_db["db"], loop_db["right"])
    report = improve(_config(loop_db))
    assert list(report.stages) == list(STAGES) and report.skipped == []
    after_rank, table = _mean_rank(loop_db["db"], loop_db["right"])
    # The new version answers, with the fine-tuned model, and ranks the marked images higher.
    assert table.version == report.version != before_table.version
    assert table.model_id == report.model_id != before_table.model_id
    assert after_rank < before_rank, (before_rank, after_rank)
    versions = {v.id: v for v in list_versions(loop_db["db"])}
    assert versions[report.version].active and not versions[report.base_version].active
    assert versions[report.version].items == 32
    assert versions[report.version].metrics["mean_recall"] == report.after
    assert str(versions[report.version].checkpoint).startswith(str(loop_db["db"] / "models"))
    # 4 feedback rows repeated to half of the rows, beside the 32 original pairs.
    assert report.train_rows == 4 * 8 + 32 and report.feedback.startswith(str(loop_db["root"]))

    again = improve(_config(loop_db))  # every stage is done: nothing runs again
    assert again.skipped == list(STAGES)
    # A stricter margin later does not un-decide a run whose version is built.
    assert improve(_config(loop_db, max_drop=-100.0)).activated
    assert (again.version, again.before, again.after) == (
        report.version,
        report.before,
        report.after,
    )


def test_worse_model_is_refused_with_both_figures_and_nothing_indexed(loop_db):
    with pytest.raises(
        ImproveRefused, match=r"mean recall .* went \d+\.\d -> \d+\.\d .*max-drop -100"
    ):
        improve(_config(loop_db, max_drop=-100.0))  # demand a 100-point gain
    assert [v.id for v in list_versions(loop_db["db"])] == ["v1"]
    # The same run with a margin it meets continues from the stored figures: no new training.
    report = improve(_config(loop_db, max_drop=100.0))
    assert report.skipped == ["export", "baseline", "finetune", "evaluate"]
    assert report.activated and [v.active for v in list_versions(loop_db["db"])] == [False, True]


def test_no_feedback_and_changed_settings_are_one_line_errors(loop_db):
    FeedbackStore(loop_db["db"]).clear()
    with pytest.raises(InputDataError, match="no usable feedback for table 'images' .*0 labels"):
        improve(_config(loop_db))
    (loop_db["root"] / "run" / "improve.json").write_text(
        json.dumps({"config": {**_config(loop_db).signature(), "steps": 5}, "stages": {}})
    )
    with pytest.raises(ConfigError, match="holds an improve run with other settings .steps."):
        improve(_config(loop_db))
    with pytest.raises(ConfigError, match="feedback_fraction must be in"):
        _config(loop_db, feedback_fraction=0.0)
    with pytest.raises(ConfigError, match="train and held_out are the same file"):
        _config(loop_db, train=str(loop_db["held_out"]))


def test_feedback_commands_list_export_clear(loop_db, tmp_path):
    db = str(loop_db["db"])
    listed = runner.invoke(cli, ["feedback", "list", "--db", db, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 12 and sum(r["label"] for r in rows) == 4 - 8
    out = tmp_path / "fb.jsonl"
    exported = runner.invoke(cli, ["feedback", "export", "--db", db, "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert "4 pairs with 8 hard negatives from 4 queries" in exported.stdout
    assert all(len(json.loads(x)["negatives"]) == 2 for x in out.read_text().splitlines())
    cleared = runner.invoke(cli, ["feedback", "clear", "--db", db, "--yes"])
    assert cleared.exit_code == 0 and "deleted 12 labels" in cleared.stdout
    refused = runner.invoke(
        cli,
        [
            "improve",
            "--db",
            db,
            "--held-out",
            str(loop_db["held_out"]),
            "--output",
            str(tmp_path / "run"),
        ],
    )
    assert refused.exit_code == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no usable feedback for table 'images'" in errors[0]
    assert refused.stderr.splitlines()[0] == "stage 1/6 export ..."  # progress is visible
