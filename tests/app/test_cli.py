import logging

import torch
from typer.testing import CliRunner

from app.cli import cli
from beit3 import create_model, load_checkpoint
from tests.reference import build_reference

runner = CliRunner()


def test_presets_lists_sizes():
    result = runner.invoke(cli, ["presets"])
    assert result.exit_code == 0
    assert "beit3-base " in result.output and "222.2M" in result.output


def test_logging_outlives_the_runner_stream(capsys):
    # CliRunner swaps sys.stderr for a stream it closes afterwards; the CLI's log handler must
    # follow sys.stderr, not keep the closed stream ("--- Logging error ---" on every record).
    assert runner.invoke(cli, ["presets"]).exit_code == 0
    logging.getLogger("beit3.test").info("after the runner")
    err = capsys.readouterr().err
    assert "after the runner" in err and "Logging error" not in err


def test_convert_writes_a_loadable_checkpoint(tmp_path, spm_path):
    model = create_model("beit3-tiny")
    ref = build_reference(model.config, model.state_dict())
    pth = tmp_path / "beit3_tiny.pth"
    torch.save({"model": ref.state_dict()}, pth)
    result = runner.invoke(
        cli, ["convert", str(pth), str(tmp_path / "out"), "--spm", str(spm_path)]
    )
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.model_id in result.output


def test_bad_input_is_one_line_and_exit_2(tmp_path, spm_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    result = runner.invoke(
        cli, ["convert", str(junk), str(tmp_path / "out"), "--spm", str(spm_path)]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line]
    assert lines == [
        f"error: {junk}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    ]


def test_missing_file_is_a_usage_error(tmp_path):
    result = runner.invoke(
        cli,
        ["convert", str(tmp_path / "nope.pth"), str(tmp_path / "o"), "--spm", str(tmp_path / "x")],
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output
