"""beit3: a BEiT-3 Multiway Transformer that loads Microsoft's checkpoints unchanged.

Public surface::

    from beit3 import create_model, load_checkpoint, save_checkpoint
    model = create_model("beit3-tiny")                      # Beit3ForRetrieval
    ckpt = load_checkpoint("path/to/checkpoint_dir")       # model + tokenizer + preprocess
    ckpt.model.encode_image(images); ckpt.model.encode_text(ids, padding_mask)
"""

from beit3.checkpoint import (
    Checkpoint,
    import_official,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)
from beit3.config import Beit3Config, create_config, get_preset, list_presets, register_preset
from beit3.errors import (
    Beit3Error,
    CheckpointError,
    ConfigError,
    IndexMismatchError,
    InputDataError,
    UnknownPresetError,
)
from beit3.factory import create_model, register_architecture
from beit3.heads import Beit3ForRetrieval, RetrievalOutput
from beit3.model import Beit3Model, Beit3Output
from beit3.tokenizer import TextBatch, TextTokenizer, train_sentencepiece
from beit3.transforms import ImageTransform, PreprocessConfig, TrainImageTransform, load_image

__all__ = [
    "Beit3Config",
    "Beit3Error",
    "Beit3ForRetrieval",
    "Beit3Model",
    "Beit3Output",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "ImageTransform",
    "IndexMismatchError",
    "InputDataError",
    "PreprocessConfig",
    "RetrievalOutput",
    "TextBatch",
    "TextTokenizer",
    "TrainImageTransform",
    "UnknownPresetError",
    "create_config",
    "create_model",
    "get_preset",
    "import_official",
    "list_presets",
    "load_checkpoint",
    "load_image",
    "load_state_dict_checked",
    "register_architecture",
    "register_preset",
    "save_checkpoint",
    "train_sentencepiece",
]
__version__ = "0.1.0"

# Registers the pretraining architecture (after the names above: it imports them).
import beit3.pretrain  # noqa: E402, F401
