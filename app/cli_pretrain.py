"""`beit3 pretrain` and `beit3 tokenizer train-visual|train-text|convert-visual`.

Each command builds a config dataclass and calls one library function. Options not listed here
go through ``--set key=value`` (any field of the config; values are JSON, else strings).
Multi-GPU: ``torchrun --nproc_per_node 8 -m app.cli pretrain ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

_SET = typer.Option("--set", help="Any other config field: key=value (value as JSON).")
_DEVICE = typer.Option("--device", help="auto, cpu, cuda ...")


def _parse_sets(items: list[str], option: str = "--set") -> dict[str, Any]:
    from beit3.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _progress_bar(desc: str) -> tuple[Any, Any]:
    """A progress(step, total) callback drawing a tqdm bar (on rank 0 only under torchrun)."""
    from tqdm import tqdm

    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, disable=True if rank else None)

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    return progress, bar.close


def register(cli: typer.Typer) -> None:
    """Add ``pretrain`` and the ``tokenizer`` group to ``cli``."""

    @cli.command("pretrain")
    def pretrain_cmd(
        output_dir: Annotated[Path, typer.Option(file_okay=False, help="Run directory.")],
        pairs: Annotated[
            list[str],
            typer.Option(
                help="Image-text pairs: JSONL/CSV manifest, captioned image folder, .tar shards."
            ),
        ] = [],  # noqa: B006
        texts: Annotated[
            list[str],
            typer.Option(help="Text files for the text-only stream (default: the pair captions)."),
        ] = [],  # noqa: B006
        images: Annotated[
            list[str],
            typer.Option(
                help="Image folders for the image-only stream (default: the pair images)."
            ),
        ] = [],  # noqa: B006
        preset: Annotated[str, typer.Option(help="Model preset.")] = "beit3-base",
        tokenizer: Annotated[
            Path | None,
            typer.Option(exists=True, help="Sentencepiece model (beit3 tokenizer train-text)."),
        ] = None,
        visual_tokenizer: Annotated[
            Path | None,
            typer.Option(
                exists=True, file_okay=False, help="VQ-KD dir (beit3 tokenizer train-visual)."
            ),
        ] = None,
        init_from: Annotated[
            Path | None,
            typer.Option(exists=True, file_okay=False, help="Checkpoint dir to start from."),
        ] = None,
        max_steps: Annotated[int, typer.Option(min=1)] = 1_000_000,
        lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
        warmup_steps: Annotated[int, typer.Option(min=0)] = 10_000,
        resume: Annotated[str | None, typer.Option(help="'latest' or a step directory.")] = None,
        set_: Annotated[list[str], _SET] = [],  # noqa: B006
        device: Annotated[str, _DEVICE] = "auto",
    ) -> None:
        """Masked data modeling pretraining on texts, images and image-text pairs."""
        from beit3.pretrain import PretrainConfig, pretrain

        fields = {
            "output_dir": str(output_dir),
            "pair_data": pairs,
            "text_data": texts,
            "image_data": images,
            "preset": preset,
            "max_steps": max_steps,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "resume": resume,
            "device": device,
            "tokenizer": str(tokenizer) if tokenizer else None,
            "visual_tokenizer": str(visual_tokenizer) if visual_tokenizer else None,
            "init_from": str(init_from) if init_from else None,
            **_parse_sets(set_),
        }
        progress, close = _progress_bar("pretrain")
        try:
            result = pretrain(PretrainConfig.from_dict(fields), progress=progress)
        finally:
            close()
        loss = result.metrics.get("loss", float("nan"))
        typer.echo(
            f"pretrained {result.steps} steps (loss {loss:.4f}); checkpoint "
            f"{result.checkpoint} {result.model_id}".rstrip()
        )

    tokenizer_cli = typer.Typer(help="Train the text and visual tokenizers.", no_args_is_help=True)
    cli.add_typer(tokenizer_cli, name="tokenizer")

    @tokenizer_cli.command("train-visual")
    def train_visual_cmd(
        data: Annotated[
            list[str], typer.Argument(help="Image folders or pair manifests whose images are used.")
        ],
        output_dir: Annotated[Path, typer.Option(file_okay=False, help="Run directory.")],
        preset: Annotated[str, typer.Option(help="vqkd-tiny, vqkd-base ...")] = "vqkd-base",
        teacher: Annotated[
            str, typer.Option(help="pixels, pixels-patchnorm, or a BEiT-3 checkpoint dir.")
        ] = "pixels",
        batch_size: Annotated[int, typer.Option(min=1)] = 64,
        max_steps: Annotated[int, typer.Option(min=1)] = 50_000,
        override: Annotated[
            list[str],
            typer.Option(help="VQ-KD architecture field: key=value (e.g. codebook_size=1024)."),
        ] = [],  # noqa: B006
        resume: Annotated[str | None, typer.Option(help="'latest' or a step directory.")] = None,
        set_: Annotated[list[str], _SET] = [],  # noqa: B006
        device: Annotated[str, _DEVICE] = "auto",
    ) -> None:
        """Train a VQ-KD visual tokenizer (writes OUTPUT_DIR/tokenizer)."""
        from beit3.pretrain import VisualTokenizerConfig, train_visual_tokenizer

        fields = {
            "output_dir": str(output_dir),
            "data": data,
            "preset": preset,
            "teacher": teacher,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "overrides": _parse_sets(override, "--override"),
            "resume": resume,
            "device": device,
            **_parse_sets(set_),
        }
        progress, close = _progress_bar("train-visual")
        try:
            result = train_visual_tokenizer(VisualTokenizerConfig.from_dict(fields), progress)
        finally:
            close()
        usage = result.metrics.get("codebook_usage", float("nan"))
        typer.echo(f"wrote {result.path} (codebook usage {usage:.1%} in the last log window)")

    @tokenizer_cli.command("train-text")
    def train_text_cmd(
        files: Annotated[
            list[Path],
            typer.Argument(
                exists=True, dir_okay=False, help="Text files (one per line) or JSONL/CSV."
            ),
        ],
        output: Annotated[Path, typer.Option(help="A .model file or a directory.")],
        vocab_size: Annotated[int, typer.Option(min=10)] = 64000,
        column: Annotated[str | None, typer.Option(help="JSONL field / CSV column.")] = None,
        lowercase: Annotated[bool, typer.Option(help="Case-fold (baked into the model).")] = False,
    ) -> None:
        """Train a sentencepiece text tokenizer with the XLM-R id layout BEiT-3 uses."""
        from beit3.data import read_texts
        from beit3.tokenizer import TextTokenizer, train_sentencepiece

        texts = (t for f in files for t in read_texts(f, column))
        path = train_sentencepiece(texts, output, vocab_size=vocab_size, lowercase=lowercase)
        typer.echo(f"wrote {path} ({TextTokenizer(path).vocab_size} ids incl. <pad> and <mask>)")

    @tokenizer_cli.command("convert-visual")
    def convert_visual_cmd(
        pth: Annotated[
            Path,
            typer.Argument(exists=True, dir_okay=False, help="Released BEiT v2 VQ-KD .pth file."),
        ],
        output: Annotated[Path, typer.Argument(file_okay=False, help="Directory to write.")],
        preset: Annotated[
            str, typer.Option(help="vqkd-base, vqkd-base-3x, vqkd-base-dino.")
        ] = "vqkd-base",
    ) -> None:
        """Import a released BEiT v2 VQ-KD tokenizer (e.g. vqkd_encoder_base_decoder_1x768x12_clip)."""
        from beit3.pretrain.vqkd import import_official_vqkd

        typer.echo(f"wrote {import_official_vqkd(pth, output, preset=preset)}")
