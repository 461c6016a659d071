import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import cli
from beit3.tokenizer import TextTokenizer
from tests.beit3.pretrain.helpers import make_shapes_manifest, read_metrics, train_tiny_vqkd

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shapes_manifest(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def visual(tmp_path_factory, manifest):
    return train_tiny_vqkd(tmp_path_factory.mktemp("vqkd"), manifest)


def _tiny_args(spm_path) -> list[str]:
    vocab = TextTokenizer(spm_path).vocab_size
    return [
        "--preset",
        "beit3-tiny",
        "--tokenizer",
        str(spm_path),
        "--set",
        f'model_overrides={{"vocab_size": {vocab}}}',
        "--set",
        "num_workers=0",
        "--set",
        "tensorboard=false",
        "--set",
        "text_batch_size=8",
        "--set",
        "image_batch_size=8",
        "--set",
        "pair_batch_size=8",
    ]


def test_pretrain_smoke_mode(tmp_path, spm_path, manifest, visual):
    result = runner.invoke(
        cli,
        [
            "pretrain",
            "--output-dir",
            str(tmp_path / "run"),
            "--pairs",
            str(manifest),
            "--visual-tokenizer",
            str(visual),
            "--max-steps",
            "2",
            "--set",
            "log_every=1",
            *_tiny_args(spm_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "pretrained 2 steps" in result.output and "beit3-tiny@" in result.output
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_pretrain_typo_is_one_line_exit_2(tmp_path, spm_path, manifest):
    result = runner.invoke(
        cli,
        [
            "pretrain",
            "--output-dir",
            str(tmp_path),
            "--pairs",
            str(manifest),
            "--set",
            "text_mask_ratoi=0.2",
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: unknown PretrainConfig key 'text_mask_ratoi'; did you mean 'text_mask_ratio'?"
    ]


def test_pretrain_on_images_without_visual_tokenizer_exit_2(tmp_path, spm_path, manifest):
    result = runner.invoke(
        cli,
        [
            "pretrain",
            "--output-dir",
            str(tmp_path / "run"),
            "--pairs",
            str(manifest),
            "--max-steps",
            "1",
            *_tiny_args(spm_path),
        ],
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "needs a visual tokenizer" in lines[0]


def test_train_visual_writes_a_tokenizer_and_resumes(tmp_path, manifest):
    args = [
        "tokenizer",
        "train-visual",
        str(manifest),
        "--output-dir",
        str(tmp_path),
        "--preset",
        "vqkd-tiny",
        "--max-steps",
        "4",
        "--batch-size",
        "16",
        "--override",
        "codebook_size=16",
        "--set",
        "num_workers=0",
        "--set",
        "tensorboard=false",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "codebook usage" in result.output
    config = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert config["config"]["codebook_size"] == 16 and config["teacher"] == "pixels"
    # A longer run of the same directory continues from step 4.
    args[args.index("--max-steps") + 1] = "6"
    result = runner.invoke(cli, [*args, "--resume", "latest"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [4, 6]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000006",
    ]


def test_train_text_makes_a_tokenizer(tmp_path):
    corpus = tmp_path / "texts.txt"
    corpus.write_text(
        "\n".join(
            f"a {c} {s} number {i}"
            for i in range(30)
            for c in ("red", "green", "blue")
            for s in ("circle", "cross")
        )
    )
    result = runner.invoke(
        cli,
        [
            "tokenizer",
            "train-text",
            str(corpus),
            "--output",
            str(tmp_path / "spm"),
            "--vocab-size",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    tok = TextTokenizer(tmp_path / "spm")
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


def test_convert_visual_rejects_a_non_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    result = runner.invoke(cli, ["tokenizer", "convert-visual", str(junk), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {junk}: cannot read as a weights-only PyTorch file")
