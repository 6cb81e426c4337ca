"""hetune.data.text.pad_documents and its two consumers (SHE-LoRA's token_blocks, SFPrompt's encode).

The consumers used to tokenize and pad on their own; ``old_token_blocks`` and
``old_encode`` are those bodies as they were (commit 25b5d26), kept here so that the
shared helper is checked to give each consumer exactly the arrays it gave before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetune.data.federated import make_federated_text
from hetune.data.text import IGNORE, pad_documents
from hetune.errors import ConfigError
from hetune.models.builtin import byte_tokenizer
from hetune.protocols.sfprompt.data import encode
from hetune.protocols.she_lora.task import token_blocks

EDGE_DOCS = ["", "a", "é 日本 \u2028 tab\tend", "x" * 300]


def old_token_blocks(tokenizer, docs, seq_len):
    enc = [tokenizer(d, add_special_tokens=False)["input_ids"][:seq_len] for d in docs]
    width = max(len(e) for e in enc)
    x = np.zeros((len(enc), width), dtype=np.int64)
    y = np.full((len(enc), width), -100, dtype=np.int64)
    for i, e in enumerate(enc):
        x[i, : len(e)] = e
        y[i, : len(e)] = e
    return x, y


def old_encode(tokenizer, texts, seq_len):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:seq_len] for t in texts]
    length = max(len(i) for i in ids)
    x = torch.full((len(ids), length), pad, dtype=torch.long)
    y = torch.full((len(ids), length), -100, dtype=torch.long)
    for row, tokens in enumerate(ids):
        x[row, : len(tokens)] = torch.tensor(tokens)
        y[row, : len(tokens) - 1] = torch.tensor(tokens[1:])
    return x, y


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from hetune.models.loading import local_source

    return AutoTokenizer.from_pretrained(local_source("smollm2-135m"))  # the converted directory: no weights read


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def tokenizer(request):
    return byte_tokenizer() if request.param == "bytes" else smollm2_tokenizer()


@pytest.fixture(scope="module")
def documents():
    fed = make_federated_text("knowledge", 2, 0, max_docs=6)
    return [d for client in fed.clients for d in client] + fed.eval_texts[:4] + EDGE_DOCS


@pytest.mark.parametrize("seq_len", [1, 7, 64, 4096])
def test_both_consumers_give_exactly_what_they_gave_before(tokenizer, documents, seq_len):
    x, y = token_blocks(tokenizer, documents, seq_len)
    want_x, want_y = old_token_blocks(tokenizer, documents, seq_len)
    assert x.dtype == want_x.dtype == np.int64 and np.array_equal(x, want_x) and np.array_equal(y, want_y)
    documents = [d for d in documents if d]  # the old encode failed on an empty document (a shape error)
    data = encode(tokenizer, documents, seq_len)
    want_x, want_y = old_encode(tokenizer, documents, seq_len)
    assert data.x.dtype == torch.long and torch.equal(data.x, want_x) and torch.equal(data.y, want_y)


def test_encode_takes_an_empty_document_as_padding_without_targets(tokenizer):
    data = encode(tokenizer, ["", "two words and more"], 8)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert (data.x[0] == pad).all() and (data.y[0] == IGNORE).all() and (data.y[1] != IGNORE).any()


def test_rows_are_documents_cut_and_right_padded(tokenizer):
    docs = ["hello world, hello", "", "a much longer document than the others, cut at the limit"]
    ids, labels = pad_documents(docs, tokenizer, seq_len=6, pad=-7)
    tokens = [tokenizer(d, add_special_tokens=False)["input_ids"][:6] for d in docs]
    assert ids.shape == labels.shape == (3, max(len(t) for t in tokens))
    for row, t in enumerate(tokens):
        assert ids[row, : len(t)].tolist() == labels[row, : len(t)].tolist() == t
        assert (ids[row, len(t) :] == -7).all() and (labels[row, len(t) :] == IGNORE).all()


def test_no_documents_is_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match="no documents"):
        pad_documents([], tokenizer, 8, 0)
    with pytest.raises(ConfigError, match="no training document"):  # SHE-LoRA's own message for an empty client
        token_blocks(tokenizer, [], 8)
