"""Video models: C3D, CNN-LSTM, space-time graph, attention summarizer, multimodal sentiment (pure PyTorch),
and the VideoMAE and TimeSformer transformers of Hugging Face `transformers` (imported only when built).

`build(name, **kwargs)` makes any of them from `MODELS`; every model carries a `ModelSpec` (`model.spec`) that
`save_model` writes with its weights and `load_model` restores.
"""

from models._hf import read_weights_file
from models.c3d import C3D, load_sports1m_state_dict
from models.fuse import fuse_for_inference
from models.graph import SpaceTimeGraph
from models.heads import Heads, head_loss
from models.lstm import CNNLSTM
from models.multitask import Ensemble, MultiTask
from models.registry import MODELS, build, from_recipe, load_model, load_weights, model_recipe, save_model
from models.sentiment import SentimentModel
from models.spec import SCALAR_HEADS, SENTIMENT_LABELS, ModelSpec, example_input
from models.summarizer import AttentionSummarizer
from models.text import HashingTokenizer
from models.video_transformer import VideoTransformer, timesformer, videomae

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
    "VideoTransformer",
    "build",
    "example_input",
    "from_recipe",
    "fuse_for_inference",
    "head_loss",
    "load_model",
    "load_sports1m_state_dict",
    "load_weights",
    "model_recipe",
    "read_weights_file",
    "save_model",
    "timesformer",
    "videomae",
]
