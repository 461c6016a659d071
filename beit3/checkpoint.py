"""Checkpoints as directories, and the import of Microsoft's official ``.pth`` files.

A checkpoint directory holds::

    config.json        {"format_version", "architecture", "preset", "overrides", "model_id"}
    model.safetensors  the state dict (metadata: format_version, architecture, preset)
    tokenizer/         sentencepiece.bpe.model
    preprocess.json    image size, mean, std, interpolation, max text length

The model id ``<preset>@<first 12 hex of sha256(model.safetensors)>`` names the weights
everywhere (an index records it). Directories are written to a temporary sibling and renamed, so
a crash never leaves half a checkpoint. :func:`import_official` is the only place that unpickles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.config import Beit3Config, create_config, get_preset, list_presets
from beit3.errors import Beit3Error, CheckpointError
from beit3.factory import architecture_of, get_architecture
from beit3.heads import Beit3ForRetrieval, Beit3WithMatcher
from beit3.tokenizer import TextTokenizer
from beit3.transforms import PreprocessConfig

__all__ = [
    "Checkpoint",
    "compute_model_id",
    "import_official",
    "load_checkpoint",
    "load_state_dict_checked",
    "read_checkpoint_config",
    "save_checkpoint",
    "save_state_checkpoint",
    "transfer_state",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BACKBONE_PREFIX = "beit3."
# Keys an official pretraining checkpoint may carry that no task model of ours uses.
PRETRAINING_HEAD_PREFIXES = ("mim_head.", "mlm_head.", "beit3.encoder.output_projection.")


@dataclass
class Checkpoint:
    """A loaded checkpoint directory."""

    model: nn.Module
    tokenizer: TextTokenizer
    preprocess: PreprocessConfig
    config: Beit3Config
    preset: str
    architecture: str
    model_id: str
    path: Path

    @property
    def retrieval_model(self) -> Beit3ForRetrieval:
        """The model as a dual encoder (``encode_image`` / ``encode_text``).

        Raises:
            CheckpointError: the checkpoint holds another architecture (e.g. a pretraining one).
        """
        if not isinstance(self.model, Beit3ForRetrieval):
            raise CheckpointError(
                f"{self.path} is a {self.architecture} checkpoint; indexing and search need a "
                "retrieval model (fine-tune it first)"
            )
        return self.model

    @property
    def matcher(self) -> Beit3WithMatcher:
        """The model as a fusion-encoder matcher (``match_probability``).

        Raises:
            CheckpointError: the checkpoint has no matcher (every official one, and any
                fine-tuned without ``--itm``).
        """
        if not isinstance(self.model, Beit3WithMatcher):
            raise CheckpointError(
                f"{self.path} ({self.model_id}) has no matcher: fine-tune it with --itm "
                "(beit3 finetune PAIRS --init CKPT --itm) to rerank with the fusion encoder"
            )
        return self.model


# Settings of a run, not of the weights: a saved checkpoint keeps the preset's values, and
# load_checkpoint(..., drop_path_rate=0.1) sets them again for the next run.
RUNTIME_FIELDS = frozenset({"drop_path_rate", "use_checkpoint", "attention"})


def _overrides(config: Beit3Config, preset: str) -> dict[str, Any]:
    base = get_preset(preset)
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in RUNTIME_FIELDS and getattr(config, f.name) != getattr(base, f.name)
    }


def compute_model_id(preset: str, weights_file: str | Path) -> str:
    digest = hashlib.sha256()
    with open(weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"{preset}@{digest.hexdigest()[:12]}"


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    preset: str,
    tokenizer: TextTokenizer | str | Path,
    preprocess: PreprocessConfig | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """Write ``model`` as a checkpoint directory at ``path`` (replacing it atomically).

    Args:
        model: an unwrapped model of a registered architecture (not DDP / compiled wrappers).
        path: the directory to write.
        preset: the preset the model's config derives from; differences are stored as overrides.
        tokenizer: the text tokenizer (or its sentencepiece model file).
        preprocess: image/text preprocessing; default: the model's img_size, mean = std = 0.5.
        dtype: store floating tensors in this dtype (e.g. ``torch.float16`` to halve the size).

    Returns:
        The model id.
    """
    from safetensors.torch import save_file

    try:
        architecture = architecture_of(model)
    except Beit3Error as exc:
        raise CheckpointError(f"cannot save: {exc}") from None
    config: Beit3Config = model.config  # type: ignore[assignment]
    overrides = _overrides(config, preset)
    if isinstance(tokenizer, str | Path):
        tokenizer = TextTokenizer(tokenizer)
    if preprocess is None:
        preprocess = PreprocessConfig(img_size=config.img_size, max_text_len=tokenizer.max_len)
    if preprocess.img_size != config.img_size:
        raise CheckpointError(
            f"preprocess img_size {preprocess.img_size} differs from the model's {config.img_size}"
        )
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(("module.", "_orig_mod.")):
            raise CheckpointError(f"key {key!r} comes from a wrapper: save the unwrapped module")
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "architecture": architecture,
            "preset": preset,
        }
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        model_id = compute_model_id(preset, tmp / "model.safetensors")
        (tmp / "config.json").write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "architecture": architecture,
                    "preset": preset,
                    "overrides": overrides,
                    "architecture_args": dict(getattr(model, "architecture_args", {})),
                    "model_id": model_id,
                },
                indent=2,
            )
            + "\n"
        )
        tokenizer.save(tmp / "tokenizer")
        preprocess.save(tmp / "preprocess.json")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s to %s", model_id, path)
    return model_id


def save_state_checkpoint(
    template: nn.Module,
    state: dict[str, Tensor],
    path: str | Path,
    *,
    preset: str,
    tokenizer: TextTokenizer | str | Path,
    preprocess: PreprocessConfig | None = None,
    config: Beit3Config | None = None,
) -> str:
    """Write a full state dict (e.g. gathered from an FSDP-sharded model) as a checkpoint
    directory: a clean copy of ``template``'s architecture is built on the meta device with
    ``config`` (default: the template's) and its own architecture args, takes ``state`` strictly,
    and is saved by :func:`save_checkpoint`.

    Returns:
        The model id.
    """
    args = dict(getattr(template, "architecture_args", {}))
    factory = get_architecture(architecture_of(template))
    with torch.device("meta"):
        clean = factory(config or template.config, **args)
    load_state_dict_checked(clean, state, source="the trained model", preset=preset, assign=True)
    return save_checkpoint(clean, path, preset=preset, tokenizer=tokenizer, preprocess=preprocess)


def replace_dir(src: Path, dst: Path) -> None:
    """Put the finished directory ``src`` at ``dst``, replacing any old one by renames only (the
    old directory is removed last), so a reader never sees a half-written ``dst``."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is not a directory (expected config.json, "
            "model.safetensors, tokenizer/, preprocess.json)"
        )
    for name in ("config.json", "model.safetensors", "preprocess.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
    try:
        meta = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({exc})") from None
    for key in ("preset", "overrides", "architecture"):
        if key not in meta:
            raise CheckpointError(f"{path / 'config.json'} lacks the key {key!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta['format_version']} is newer than this library's "
            f"{FORMAT_VERSION}; upgrade beit3-search"
        )
    return meta


def load_checkpoint(
    path: str | Path,
    architecture: str | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    architecture_args: Mapping[str, Any] | None = None,
    img_size: int | None = None,
    **config_overrides: Any,
) -> Checkpoint:
    """Load a checkpoint directory.

    Args:
        path: the directory.
        architecture: the model to build (``retrieval``, ``pretraining``...); default: the saved
            one. Loading into another architecture transfers the backbone (``beit3.*``) strictly
            and initialises the other heads fresh.
        device: where to put the model.
        verify: check that model.safetensors still hashes to the model id in config.json.
        architecture_args: constructor arguments of ``architecture`` when it is not the saved
            one (e.g. ``{"fusion_layers": 6}`` for a matcher made from a dual encoder); the
            saved architecture is always built with its saved arguments.
        img_size: build the model for this image size instead of the saved one: the vision
            position table is resized bicubically (:func:`interpolate_vision_positions`) and the
            preprocessing follows, as fine-tuning at a higher resolution does.
        config_overrides: runtime-only config changes (``drop_path_rate``, ``use_checkpoint``,
            ``attention``); the weights must still fit.

    Raises:
        CheckpointError: naming the directory and the mismatching keys.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_checkpoint_config(path)
    saved_arch = meta["architecture"]
    architecture = architecture or saved_arch
    try:
        factory = get_architecture(architecture)
    except Beit3Error as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    preset = meta["preset"]
    try:
        config = create_config(preset, **meta["overrides"])
        if config_overrides:
            config = config.replace(**config_overrides)
    except Beit3Error as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    model_id = compute_model_id(preset, path / "model.safetensors")
    if verify and meta.get("model_id") and meta["model_id"] != model_id:
        raise CheckpointError(
            f"{path / 'model.safetensors'} hashes to {model_id} but config.json says "
            f"{meta['model_id']}: the weights were changed or corrupted; re-save the checkpoint"
        )
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({exc})") from None

    preprocess = PreprocessConfig.load(path / "preprocess.json")
    if img_size is not None and img_size != config.img_size:
        try:
            config = config.replace(img_size=img_size)
        except Beit3Error as exc:
            raise CheckpointError(f"{path}: img_size {img_size}: {exc}") from None
        key = BACKBONE_PREFIX + "encoder.embed_positions.A.weight"
        state[key] = interpolate_vision_positions(state[key], config.num_patches)
        preprocess = dataclasses.replace(preprocess, img_size=img_size)

    same = architecture == saved_arch
    # Constructor arguments beyond the config (e.g. the MIM head's codebook size) belong to the
    # saved architecture; another architecture gets its defaults.
    # A checkpoint saved before an argument existed gets the value it was built with.
    legacy = dict(getattr(factory, "legacy_architecture_args", {}))
    arch_args = (
        {**legacy, **meta.get("architecture_args", {})} if same else dict(architecture_args or {})
    )
    with torch.device("meta") if same else contextlib.nullcontext():
        model = factory(config, **arch_args)
    if same:
        load_state_dict_checked(model, state, source=str(path), preset=preset, assign=True)
    else:
        transfer_state(model, state, source=str(path), preset=preset)
    model.to(device=device, dtype=torch.float32)
    tok_dir = path / "tokenizer"
    tokenizer = TextTokenizer(tok_dir, max_len=preprocess.max_text_len)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's text table has "
            f"{config.vocab_size} rows"
        )
    logger.info("loaded %s (%s) from %s", model_id, architecture, path)
    return Checkpoint(
        model.eval(), tokenizer, preprocess, config, preset, architecture, model_id, path
    )


def transfer_state(
    model: nn.Module, state: dict[str, Tensor], *, source: str, preset: str = "?"
) -> list[str]:
    """Load another architecture's weights into ``model``: the backbone (``beit3.*``) strictly,
    every other tensor whose name and shape ``model`` shares (e.g. the retrieval heads into a
    model with a matcher); the rest of ``model`` keeps its fresh initialisation.

    Returns:
        The names in ``state`` that were not carried over (e.g. pretraining heads).
    """
    own = model.state_dict()
    keep = {
        k: v
        for k, v in state.items()
        if not k.startswith(PRETRAINING_HEAD_PREFIXES)
        and (k.startswith(BACKBONE_PREFIX) or (k in own and own[k].shape == v.shape))
    }
    load_state_dict_checked(
        model,
        keep,
        source=source,
        preset=preset,
        allow_missing=lambda k: not k.startswith(BACKBONE_PREFIX),
    )
    hook = getattr(model, "after_transfer_", None)
    if hook is not None:
        hook(set(keep))
    dropped = sorted(set(state) - set(keep))
    if dropped:
        logger.info("%s: %d tensors not carried over (%s)", source, len(dropped), _first(dropped))
    return dropped


def load_state_dict_checked(
    model: nn.Module,
    state: dict[str, Tensor],
    *,
    source: str,
    preset: str = "?",
    assign: bool = False,
    allow_missing: Callable[[str], bool] = lambda k: False,
    allow_unexpected: Callable[[str], bool] = lambda k: False,
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model``, raising a CheckpointError that lists what does not fit.

    Returns:
        (allowed missing keys, allowed unexpected keys).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    bad_missing = [k for k in missing if not allow_missing(k)]
    bad_unexpected = [k for k in unexpected if not allow_unexpected(k)]
    if bad_missing or bad_unexpected or shapes:
        parts = []
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing ({_first(bad_missing)})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} unexpected ({_first(bad_unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_first(shapes)}; file vs model)")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} for preset {preset}: " + "; ".join(parts)
        )
    filtered = {
        k: v.to(expected[k].dtype) if v.is_floating_point() else v
        for k, v in state.items()
        if k in expected
    }
    model.load_state_dict(filtered, strict=not missing, assign=assign)
    return missing, unexpected


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# Official checkpoints --------------------------------------------------------------------


def interpolate_vision_positions(table: Tensor, num_patches: int) -> Tensor:
    """Resize the vision position table (2 unused rows + CLS + grid) to ``num_patches`` patches.

    The first 3 rows stay; the grid is resized bicubically in fp32, as the official
    ``load_model_and_may_interpolate`` does (fp16 tables would fail on CPU, microsoft/unilm#1056).
    """
    old = int(round((table.shape[0] - 3) ** 0.5))
    new = int(round(num_patches**0.5))
    if old * old != table.shape[0] - 3 or new * new != num_patches:
        raise CheckpointError(
            f"vision position table of {table.shape[0]} rows is not 3 + a square grid"
        )
    if old == new:
        return table
    head, grid = table[:3], table[3:].float()
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, dim)  # (g'^2, D), row-major
    return torch.cat([head.float(), grid], dim=0)


def _infer_preset(state: dict[str, Tensor], img_size: int | None) -> str:
    dim = state[BACKBONE_PREFIX + "text_embed.weight"].shape[1]
    depth = len({k.split(".")[3] for k in state if k.startswith("beit3.encoder.layers.")})
    patch = state[BACKBONE_PREFIX + "vision_embed.proj.weight"].shape[-1]
    rows = state[BACKBONE_PREFIX + "encoder.embed_positions.A.weight"].shape[0]
    size = img_size or int(round((rows - 3) ** 0.5)) * patch
    candidates = [
        name
        for name in list_presets()
        if (c := get_preset(name)).embed_dim == dim and c.depth == depth and c.patch_size == patch
    ]
    for name in candidates:
        if get_preset(name).img_size == size:
            return name
    if candidates:
        return candidates[0]
    raise CheckpointError(
        f"no preset has width {dim}, depth {depth}, patch {patch}; pass --preset explicitly"
    )


def import_official(
    pth: str | Path,
    output: str | Path,
    *,
    spm: str | Path,
    preset: str | None = None,
    img_size: int | None = None,
    allow_pickle: bool = False,
) -> str:
    """Convert an official BEiT-3 ``.pth`` (e.g. ``beit3_base_patch16_384_coco_retrieval.pth``).

    Unwraps ``model`` / ``module``, casts fp16 to fp32, interpolates the vision position table to
    the target image size, drops pretraining heads (``mim_head``, MLM projection), initialises the
    retrieval heads if the file has none (pretrained, not ITC), and writes a checkpoint directory.

    Args:
        pth: the official file.
        output: the checkpoint directory to write.
        spm: the sentencepiece model (``beit3.spm``).
        preset: target preset; inferred from the tensor shapes when omitted.
        img_size: target image size (e.g. 384 to fine-tune a 224 checkpoint at 384).
        allow_pickle: load with ``weights_only=False`` (trusted files only), for files that
            carry pickled training arguments.

    Returns:
        The model id of the written checkpoint.
    """
    pth = Path(pth)
    if not pth.is_file():
        raise CheckpointError(f"{pth}: no such file")
    with open(pth, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise CheckpointError(
            f"{pth}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
        )
    try:
        raw = torch.load(pth, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{pth}: holds pickled objects besides tensors ({first[:160]}); if you trust the "
                "file, pass --allow-pickle"
            ) from None
        raise CheckpointError(f"{pth}: not a loadable PyTorch checkpoint ({first[:200]})") from None
    state = _unwrap(raw, pth)
    if not any(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {(k if k in _HEAD_KEYS else BACKBONE_PREFIX + k): v for k, v in state.items()}
    for key in (
        "text_embed.weight",
        "vision_embed.proj.weight",
        "encoder.embed_positions.A.weight",
    ):
        if BACKBONE_PREFIX + key not in state:
            raise CheckpointError(
                f"{pth}: no tensor {BACKBONE_PREFIX + key}; not a BEiT-3 checkpoint"
            )
    dropped = [k for k in state if k.startswith(PRETRAINING_HEAD_PREFIXES)]
    state = {
        k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in dropped
    }

    preset = preset or _infer_preset(state, img_size)
    config = create_config(preset)
    if img_size is not None and img_size != config.img_size:
        config = config.replace(img_size=img_size)
    key = BACKBONE_PREFIX + "encoder.embed_positions.A.weight"
    state[key] = interpolate_vision_positions(state[key], config.num_patches)

    model = Beit3ForRetrieval(config)
    missing, _ = load_state_dict_checked(
        model,
        state,
        source=str(pth),
        preset=preset,
        allow_missing=lambda k: k in _HEAD_KEYS,
    )
    if missing:
        logger.warning(
            "%s has no %s: initialised fresh; fine-tune before searching with it",
            pth,
            ", ".join(missing),
        )
    if dropped:
        logger.info("ignored %d pretraining-head tensors (%s)", len(dropped), _first(dropped))
    tokenizer = TextTokenizer(spm)
    return save_checkpoint(
        model,
        output,
        preset=preset,
        tokenizer=tokenizer,
        preprocess=PreprocessConfig(img_size=config.img_size),
    )


_HEAD_KEYS = frozenset({"vision_head.weight", "language_head.weight", "logit_scale"})


def _unwrap(raw: Any, pth: Path) -> dict[str, Tensor]:
    if isinstance(raw, dict):
        for wrapper in ("model", "module", "state_dict"):
            if wrapper in raw and isinstance(raw[wrapper], dict):
                raw = raw[wrapper]
                break
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(
            f"{pth}: expected a state dict (optionally under 'model'), got {type(raw).__name__}"
        )
    tensors = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{pth}: holds no tensors")
    return tensors
