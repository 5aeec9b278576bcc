"""The sentiment model's text branches: hashed words into a small transformer (no vocabulary, nothing to
download), or a pretrained BERT-family encoder with its own `tokenizers` tokenizer (`transformers` and
`tokenizers` are imported only then)."""

from __future__ import annotations

import inspect
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models._hf import load_weights, make_config, model_folder, plain_config, read_json, read_state_dict

_WORD = re.compile(r"[\w']+")


class HashingTokenizer:
    """Lower-cased words hashed (CRC-32, stable across processes) into `vocab_size - 1` buckets; 0 is padding.

    Self-contained: no vocabulary file, nothing downloaded, any language. Collisions are rare at the default
    8192 buckets for subtitle-sized vocabularies, and the embedding learns around them.
    """

    special_ids = (0,)  # ids that are no word: a row of only these is a text without words

    def __init__(self, vocab_size: int = 8192, max_len: int = 32) -> None:
        if vocab_size < 2 or max_len < 1:
            raise ValueError(f"tokenizer: vocab_size={vocab_size} must be >= 2 and max_len={max_len} >= 1")
        self.vocab_size = vocab_size
        self.max_len = max_len

    def ids(self, text: str | None) -> list[int]:
        """Token ids of one text, truncated to max_len; [] for None or text without words."""
        words = _WORD.findall((text or "").lower())[: self.max_len]
        return [1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 1) for w in words]

    def __call__(self, texts: Sequence[str | None]) -> torch.Tensor:
        """Padded token ids [B, L] (L = longest text, at least 1)."""
        rows = [self.ids(t) for t in texts]
        out = torch.zeros(len(rows), max([len(r) for r in rows] + [1]), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


class PretrainedTokenizer:
    """A `tokenizers` tokenizer (a tokenizer.json's content) with the HashingTokenizer's interface.

    Every text gets the tokenizer's special tokens ([CLS] … [SEP] for BERT) and is truncated to `max_len`
    ids in all; rows are padded with `pad_id`.
    """

    def __init__(self, tokenizer_json: str, max_len: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        if max_len < 2:
            raise ValueError(f"text tokenizer: max_len={max_len} must be >= 2")
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"text tokenizer: not a tokenizer.json ({' '.join(str(e).split())})") from e
        self.tokenizer.no_padding()  # rows are padded here, to the batch's longest
        self.tokenizer.enable_truncation(max_len)
        self.max_len = max_len
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad_id
        # What every text gets whatever it says ([CLS], [SEP]), and padding: a row of only these has no words.
        self.special_ids = tuple(sorted({*self.tokenizer.encode("").ids, pad_id}))

    def ids(self, text: str | None) -> list[int]:
        """Token ids of one text with the special tokens, truncated to max_len."""
        return self.tokenizer.encode(text or "").ids

    def __call__(self, texts: Sequence[str | None]) -> torch.Tensor:
        """Padded token ids [B, L] (L = longest text)."""
        rows = [e.ids for e in self.tokenizer.encode_batch([t or "" for t in texts])]
        out = torch.full((len(rows), max([len(r) for r in rows] + [1])), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def _pad_id(config: Any, tokenizer_json: str, where: str) -> int:
    """The padding id: the encoder config's, else the tokenizer's padding setting or [PAD]/<pad> token."""
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token))
    raise ValueError(f"{where}: neither the config nor the tokenizer names a padding token")


class TextEncoder(nn.Module):
    """Token ids [B, L] (0 = padding, ≥ 1 token per row) → transformer → masked mean → [B, out_dim]."""

    def __init__(
        self, vocab_size: int, max_len: int, dim: int, layers: int, out_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.out((x * keep).sum(dim=1) / keep.sum(dim=1))


class PretrainedTextEncoder(nn.Module):
    """Token ids [B, L] (padded with `pad_id`) → a pretrained BERT-family encoder → its [CLS] state → Linear →
    [B, out_dim]."""

    # Parameters of a task model built on the encoder (heads, poolers, MLM layers) and derived buffers:
    # a checkpoint may hold them, the encoder does not use them.
    TASK_KEYS = (
        r"^pooler\.", r"^cls\.", r"^lm_head\.", r"^classifier\.", r"^pre_classifier\.", r"^qa_outputs\.",
        r"^vocab_(transform|layer_norm|projector)\.", r"(^|\.)position_ids$",
    )  # fmt: skip

    def __init__(self, encoder: nn.Module, pad_id: int, out_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.out = nn.Linear(encoder.config.hidden_size, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.out(hidden[:, 0])


def pretrained_text(
    pretrained: str | os.PathLike | None,
    config: Mapping[str, Any] | None,
    tokenizer_json: str | None,
    max_len: int,
    out_dim: int,
) -> tuple[tuple[PretrainedTokenizer, PretrainedTextEncoder], dict[str, Any], str]:
    """A pretrained text branch from a local folder (or `config` + `tokenizer_json` alone, randomly
    initialized): ((tokenizer, encoder), the encoder's config as plain values, the tokenizer's JSON)."""
    where = "sentiment text encoder"
    values: dict[str, Any] = {}
    folder = None
    if pretrained is not None:
        folder = model_folder(pretrained)
        where = f"sentiment text encoder {os.fspath(pretrained)}"
        values = read_json(folder, "config.json")
        if tokenizer_json is None:
            if not (folder / "tokenizer.json").is_file():
                raise ValueError(f"{os.fspath(pretrained)}: no tokenizer.json (a `tokenizers` tokenizer)")
            tokenizer_json = (folder / "tokenizer.json").read_text()
    elif config is None or tokenizer_json is None:
        raise ValueError(
            "sentiment: a pretrained text encoder needs text_pretrained, or text_config and text_tokenizer"
        )
    values.update(config or {})
    hf_config = make_config(None, values, where)

    from transformers import MODEL_MAPPING

    cls = MODEL_MAPPING[type(hf_config)]
    # The [CLS] state is the output: a pooler would be parameters without gradients (distributed training
    # refuses those).
    takes_pooler = "add_pooling_layer" in inspect.signature(cls).parameters
    no_pooler = {"add_pooling_layer": False} if takes_pooler else {}
    encoder = cls(hf_config, **no_pooler)
    if folder is not None:
        load_weights(
            encoder,
            read_state_dict(folder),
            prefix=f"{encoder.base_model_prefix}.",
            ignore=PretrainedTextEncoder.TASK_KEYS,
            where=where,
        )
    max_len = min(max_len, getattr(hf_config, "max_position_embeddings", max_len))
    tokenizer = PretrainedTokenizer(tokenizer_json, max_len, _pad_id(hf_config, tokenizer_json, where))
    embeddings = encoder.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > embeddings:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the encoder embeds {embeddings}"
        )
    text = PretrainedTextEncoder(encoder, tokenizer.pad_id, out_dim)
    return (tokenizer, text), plain_config(hf_config), tokenizer_json
