"""Pure PyTorch video models: C3D, CNN-LSTM, space-time graph, attention summarizer, multimodal sentiment.

`build(name, **kwargs)` makes any of them from `MODELS`; every model carries a `ModelSpec` (`model.spec`) that
`save_model` writes with its weights and `load_model` restores.
"""

from models.c3d import C3D, load_sports1m_state_dict
from models.fuse import fuse_for_inference
from models.graph import SpaceTimeGraph
from models.heads import Heads, head_loss
from models.lstm import CNNLSTM
from models.multitask import Ensemble, MultiTask
from models.registry import MODELS, build, load_model, save_model
from models.sentiment import HashingTokenizer, SentimentModel
from models.spec import SCALAR_HEADS, SENTIMENT_LABELS, ModelSpec, example_input
from models.summarizer import AttentionSummarizer

__all__ = [
    "C3D",
    "CNNLSTM",
    "MODELS",
    "SCALAR_HEADS",
    "SENTIMENT_LABELS",
    "AttentionSummarizer",
    "Ensemble",
    "HashingTokenizer",
    "Heads",
    "ModelSpec",
    "MultiTask",
    "SentimentModel",
    "SpaceTimeGraph",
    "build",
    "example_input",
    "fuse_for_inference",
    "head_loss",
    "load_model",
    "load_sports1m_state_dict",
    "save_model",
]
