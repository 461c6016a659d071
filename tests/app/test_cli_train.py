import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from app.cli import cli
from beit3 import load_checkpoint
from tests.data import write_shapes

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    """See tests/training/conftest.py: one thread is as fast for tiny and immune to busy-wait
    slowdowns on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _caption_folder(folder):
    for path, caption in write_shapes(folder, size=32)[:12]:
        path.with_suffix(".txt").write_text(caption + "\n")
    return folder


def test_finetune_then_eval_on_a_caption_folder(tmp_path):
    data = _caption_folder(tmp_path / "pairs")
    run = tmp_path / "run"
    result = runner.invoke(
        cli,
        [
            "finetune",
            str(data),
            "--output-dir",
            str(run),
            "--preset",
            "beit3-tiny",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--log-every",
            "1",
            "--no-tensorboard",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"final model: {run / 'final'}" in result.output
    assert load_checkpoint(run / "final").preset == "beit3-tiny"
    assert [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]

    result = runner.invoke(
        cli,
        [
            "eval",
            str(run / "final"),
            str(data),
            "--output-dir",
            str(tmp_path / "eval"),
            "--num-workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "image->text" in result.output and "(12 images, 12 captions" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["t2i_r1"] <= 1 and metrics["num_images"] == 12


def _error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, tiny_checkpoint):
    result = runner.invoke(
        cli,
        [
            "finetune",
            str(tmp_path / "nope.jsonl"),
            "--output-dir",
            str(tmp_path / "r"),
            "--preset",
            "beit3-tiny",
        ],
    )
    assert result.exit_code == 2
    assert _error_lines(result) == [f"error: {tmp_path / 'nope.jsonl'}: no such file or folder"]

    result = runner.invoke(
        cli,
        [
            "finetune",
            "x.jsonl",
            "--output-dir",
            str(tmp_path / "r"),
            "--preset",
            "beit3-tiny",
            "--init",
            str(tiny_checkpoint),
        ],
    )
    assert result.exit_code == 2
    assert _error_lines(result)[0].startswith("error: give exactly one of init")

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "a.png", "text": ""}) + "\n")
    result = runner.invoke(cli, ["eval", str(tiny_checkpoint), str(empty)])
    assert result.exit_code == 2
    assert _error_lines(result) == [
        f"error: {empty}: no usable image-text pairs (every row lacked an image or text)"
    ]


def test_finetune_without_init_or_preset_starts_from_the_bundled_model(tmp_path):
    from app.demo import DEMO_MODEL

    data = _caption_folder(tmp_path / "pairs")
    run = tmp_path / "run"
    args = ["finetune", str(data), "--output-dir", str(run), "--max-steps", "1"]
    args += ["--batch-size", "4", "--num-workers", "0", "--no-tensorboard"]
    result = runner.invoke(cli, [*args, "--neighbour-batches", "4"])
    assert result.exit_code == 0, result.output
    assert f"starting from the bundled model {DEMO_MODEL}" in result.output
    resolved = json.loads((run / "run_config.json").read_text())["config"]
    assert resolved["init"] == str(DEMO_MODEL)
    assert resolved["init_model_id"] == load_checkpoint(DEMO_MODEL).model_id
    # --neighbour-batches: the bundled model's 16 nearest pairs of each of the 12 pairs.
    assert resolved["neighbour_batches"] == 4
    neighbours = load_file(str(run / "neighbours.safetensors"))["neighbours"]
    assert neighbours.shape == (12, 16) and (neighbours[:, :11] >= 0).all()
    assert (neighbours[:, 11:] == -1).all()  # only 11 other pairs


def test_finetune_itm_flags_reach_the_matching_task(tmp_path):
    data = _caption_folder(tmp_path / "pairs")
    base = ["finetune", str(data), "--preset", "beit3-tiny", "--max-steps", "2"]
    base += ["--batch-size", "4", "--num-workers", "0", "--no-tensorboard", "--log-every", "1"]
    result = runner.invoke(cli, [*base, "--output-dir", str(tmp_path / "x"), "--itm-only"])
    assert result.exit_code != 0 and "--itm-only and --itm-temperature need --itm" in result.output
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "--itm", "--itm-only", "--itm-temperature", "6", "2"]
    result = runner.invoke(cli, [*base, *args])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "run_config.json").read_text())["config"]
    assert config["task"] == "contrastive-itm"
    assert config["task_options"] == {
        "itm_weight": 1.0,
        "contrastive_weight": 0.0,
        "itm_temperature": 6.0,
        "itm_temperature_end": 2.0,
    }
    temperatures = [json.loads(line)["itm_temperature"] for line in (run / "metrics.jsonl").open()]
    assert temperatures == pytest.approx([6.0, 4.0])
