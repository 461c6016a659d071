import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.data import caption, pairs, write_shapes

runner = CliRunner()


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, tokenizer):
    """beit3-tiny with other weights: another model id."""
    import torch

    from beit3 import create_model, save_checkpoint

    torch.manual_seed(99)
    path = tmp_path_factory.mktemp("other") / "tiny-other"
    save_checkpoint(create_model("beit3-tiny"), path, preset="beit3-tiny", tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory, tiny_checkpoint):
    """An index with the 32 shapes and their captions, built through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    write_shapes(root / "shapes")
    (root / "caps.txt").write_text("\n".join(caption(c, s) for c, s in pairs()) + "\n")
    db = root / "db"
    images = runner.invoke(
        cli,
        [
            "index",
            "images",
            str(root / "shapes"),
            "--db",
            str(db),
            "--model",
            str(tiny_checkpoint),
            "--workers",
            "0",
        ],
    )
    assert images.exit_code == 0, images.output
    assert (
        "images: seen 32, indexed 32, unchanged 0, duplicates 0, removed 0, skipped 0"
        in images.stdout
    )
    texts = runner.invoke(
        cli, ["index", "texts", str(root / "caps.txt"), "--db", str(db), "--backend", "faiss"]
    )
    assert texts.exit_code == 0, texts.output
    assert "texts: seen 32, indexed 32" in texts.stdout
    return root, db


def test_search_prints_the_caption_of_an_image_indexed_from_a_manifest(
    tmp_path, cli_db, tiny_checkpoint
):
    root, _ = cli_db
    images = sorted((root / "shapes").glob("*.png"))[:3]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(
        "".join(json.dumps({"image": str(p), "text": f"shape {p.stem}"}) + "\n" for p in images)
    )
    db = tmp_path / "db"
    args = ["index", "images", str(manifest), "--db", str(db), "--model", str(tiny_checkpoint)]
    assert runner.invoke(cli, [*args, "--workers", "0"]).exit_code == 0
    result = runner.invoke(cli, ["search", "a shape", "--db", str(db), "--k", "3"])
    assert result.exit_code == 0, result.output
    for line in result.stdout.strip().splitlines():
        _, _, path, label = line.split(maxsplit=3)
        assert label == f"shape {path.rsplit('/', 1)[1][:-4]}"


def test_search_prints_rank_score_and_path(cli_db):
    root, db = cli_db
    result = runner.invoke(cli, ["search", "a red circle", "--db", str(db), "--k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    ranks, scores, paths = zip(*(line.split() for line in lines), strict=True)
    assert ranks == ("1", "2", "3")
    assert [float(s) for s in scores] == sorted((float(s) for s in scores), reverse=True)
    assert all(p.startswith(str(root / "shapes")) and p.endswith(".png") for p in paths)


def test_image_query_with_json_output(cli_db):
    root, db = cli_db
    image = root / "shapes" / "blue_cross_0.png"
    same = runner.invoke(
        cli, ["search", str(image), "--image", "--db", str(db), "--k", "1", "--json"]
    )
    assert same.exit_code == 0, same.output
    (hit,) = json.loads(same.stdout)
    assert hit["path"] == str(image) and hit["score"] == pytest.approx(1.0, abs=1e-5)
    texts = runner.invoke(
        cli,
        [
            "search",
            str(image),
            "--image",
            "--db",
            str(db),
            "--table",
            "texts",
            "--k",
            "4",
            "--offset",
            "2",
            "--json",
        ],
    )
    hits = json.loads(texts.stdout)
    assert [h["rank"] for h in hits] == [3, 4, 5, 6]
    assert all(h["modality"] == "text" and h["text"].startswith("a ") for h in hits)


def test_rerun_reports_nothing_to_embed(cli_db):
    root, db = cli_db
    result = runner.invoke(
        cli, ["index", "images", str(root / "shapes"), "--db", str(db), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "seen 32, indexed 0, unchanged 32" in result.stdout


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_input_exits_2_with_one_line(cli_db, tmp_path, other_checkpoint):
    root, db = cli_db
    result = runner.invoke(cli, ["search", "x", "--db", str(tmp_path)])
    assert result.exit_code == 2
    assert _error_line(result) == (
        f"error: {tmp_path} is not a beit3 index (no "
        "beit3_index.json); build one with: beit3 index images "
        "FOLDER --db DIR --model CKPT"
    )

    result = runner.invoke(
        cli,
        [
            "index",
            "images",
            str(root / "shapes"),
            "--db",
            str(db),
            "--model",
            str(other_checkpoint),
        ],
    )
    assert result.exit_code == 0, result.output  # another model: a version beside the active
    # version ids are per database: v1 images, v2 texts, v3 the new images version
    assert (
        "version v3 of 'images' built beside the active v1; switch with: beit3 versions "
        f"activate v3 --db {db}"
    ) in result.stdout
    assert "Traceback" not in result.output

    result = runner.invoke(
        cli, ["index", "images", str(root / "shapes"), "--db", str(tmp_path / "new")]
    )
    assert result.exit_code == 2
    assert "holds no index yet" in _error_line(result)

    result = runner.invoke(cli, ["search", str(root / "caps.txt"), "--image", "--db", str(db)])
    assert result.exit_code == 2
    assert _error_line(result).startswith(f"error: {root / 'caps.txt'}: not a readable image")

    result = runner.invoke(cli, ["search", "x", "--db", str(db), "--table", "nope"])
    assert result.exit_code == 2
    assert (
        _error_line(result) == f"error: index {db} has no table 'nope'; its tables: images, texts"
    )


def test_missing_path_is_a_usage_error(tmp_path):
    result = runner.invoke(
        cli, ["index", "images", str(tmp_path / "nope"), "--db", str(tmp_path / "db")]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_search_exports_every_hit_up_to_limit_as_csv_and_json(cli_db, tmp_path):
    import csv

    from indexer import Searcher

    root, db = cli_db
    expected = Searcher(db, device="cpu").search("a red circle", "images", k=25)
    out = tmp_path / "hits.csv"
    args = ["search", "a red circle", "--db", str(db), "--format", "csv", "--limit", "25"]
    result = runner.invoke(cli, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == [
        "rank",
        "score",
        "match",
        "table",
        "modality",
        "id",
        "path",
        "text",
        "paths",
        "similar",
    ]
    assert {r["similar"] for r in rows} == {"0"}  # no --collapse
    assert [r["id"] for r in rows] == [h.id for h in expected]  # 25 hits: more than one page
    assert [int(r["rank"]) for r in rows] == list(range(1, 26))
    assert [float(r["score"]) for r in rows] == pytest.approx([h.score for h in expected])
    assert rows[0]["path"] == expected[0].path and rows[0]["match"] == ""
    as_json = runner.invoke(cli, [*args[:-4], "--format", "json", "--limit", "7"])
    assert as_json.exit_code == 0, as_json.output
    assert [h["id"] for h in json.loads(as_json.stdout)] == [h.id for h in expected[:7]]


def test_search_keyword_mode_and_filters_from_the_command_line(cli_db):
    root, db = cli_db
    base = ["search", "--db", str(db), "--json", "--k", "40"]
    keyword = runner.invoke(cli, [*base, "purple_triangle", "--mode", "keyword"])
    assert keyword.exit_code == 0, keyword.output
    hits = json.loads(keyword.stdout)
    assert hits[0]["path"].endswith("purple_triangle_0.png")
    assert all("purple" in h["path"] or "triangle" in h["path"] for h in hits)
    under = runner.invoke(
        cli, [*base, "x", "--under", str(root / "shapes"), "--type", "png", "--min-width", "64"]
    )
    assert under.exit_code == 0, under.output
    assert len(json.loads(under.stdout)) == 32
    none = runner.invoke(cli, [*base, "x", "--modified-before", "2000-01-01"])
    assert none.exit_code == 0 and json.loads(none.stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--mode", "fuzzy"],
            "error: --mode: unknown mode 'fuzzy'; choose one of vector, keyword, hybrid",
        ),
        (["--format", "xml"], "error: --format: unknown format 'xml'; choose json or csv"),
        (["--limit", "5"], "error: --limit and --output go with --format json|csv"),
        (["--taken-after", "yesterday"], "error: --taken-after: cannot read 'yesterday' as a date"),
        (["--type", "*.png"], "error: --type: '*.png' is not a file extension"),
        (
            ["--table", "texts", "--mode", "hybrid"],
            "error: table 'texts' is a faiss table, which has no hybrid search",
        ),
    ],
)
def test_search_bad_mode_filter_or_format_is_one_line_naming_the_option(cli_db, args, message):
    _, db = cli_db
    result = runner.invoke(cli, ["search", "x", "--db", str(db), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr


def test_versions_list_activate_remove(tmp_path, tiny_checkpoint, other_checkpoint):
    write_shapes(tmp_path / "shapes")
    db = tmp_path / "db"
    for model in (tiny_checkpoint, other_checkpoint):
        result = runner.invoke(
            cli,
            [
                "index",
                "images",
                str(tmp_path / "shapes"),
                "--db",
                str(db),
                "--model",
                str(model),
                "--workers",
                "0",
            ],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["versions", "activate", "v9", "--db", str(db)])
    assert result.exit_code == 2
    assert _error_line(result) == "error: no version 'v9' in this index; its versions: v1, v2"
    result = runner.invoke(cli, ["versions", "remove", "v1", "--db", str(db)])
    assert result.exit_code == 2
    assert _error_line(result).startswith("error: version v1 is the active version of table")
    result = runner.invoke(cli, ["versions", "--db", str(db)])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and len(lines) == 2, result.output  # images v1 and v2
    assert lines[0].startswith("* v1   images") and lines[1].startswith("  v2   images")
    assert "32 items" in lines[1]
    result = runner.invoke(cli, ["versions", "activate", "v2", "--db", str(db)])
    assert result.exit_code == 0 and "table 'images' now searches version v2" in result.stdout
    result = runner.invoke(cli, ["versions", "remove", "v1", "--db", str(db)])
    assert result.exit_code == 0, result.output


def test_versions_list_shows_the_held_out_figure_a_checkpoint_records():
    from app.cli_versions import _metric_summary

    demo = json.loads((Path(__file__).parents[2] / "demo" / "model" / "metrics.json").read_text())
    assert (
        _metric_summary(demo) == f"test mean recall {demo['splits']['test']['average']:.1f}"
    )  # percent
    assert _metric_summary({"mean_recall": 12.34}) == "held-out mean recall 12.3"
    assert _metric_summary(None) == _metric_summary({"other": 1}) == ""
