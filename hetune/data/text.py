"""Training text: local json/jsonl/txt files (or a hub dataset when online) -> packed token blocks.

Local files are read and checked here rather than by ``datasets``: a bad file (empty, not
UTF-8, a line that is not JSON, a missing or non-string text field) fails with its name and
line before a model is built or anything is written, and the confidential text is not copied
into the ``datasets`` cache.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from hetune.errors import ConfigError

LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json"}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}
_JSON_HINT = "each line must be one JSON object (JSON Lines), or the whole file one JSON array of objects"
IGNORE = -100  # the label of a position no loss reads (cross-entropy's ignore_index)


def load_texts(sources: list[str] | tuple[str, ...], text_field: str = "text") -> list[str]:
    """The training documents, from local files or one hub dataset name."""
    if not sources:
        raise ConfigError("no training data given", "pass --data FILE (json, jsonl or txt)")
    paths = [Path(s) for s in sources]
    if not any(p.suffix in LOCAL_FORMATS or p.exists() for p in paths):
        return _hub_texts(sources[0], text_field)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"data file(s) not found: {', '.join(missing)}", "check the --data paths")
    kinds = {LOCAL_FORMATS.get(p.suffix) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(f"data files must all be .txt or all .json/.jsonl, got {[p.name for p in paths]}", "convert them to one format")
    if kinds == {"text"} and text_field != "text":
        raise ConfigError(f"--text-field {text_field!r} applies to json/jsonl data, not .txt files", "drop --text-field")
    texts: list[str] = []
    for path in paths:
        texts += _txt_lines(path) if kinds == {"text"} else _json_texts(path, text_field)
    return texts


def _read_utf8(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); an unreadable, blank or non-UTF-8 file fails here."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read data file {path}: {err.strerror}", "check the file's permissions") from err
    if not data.strip():
        raise ConfigError(f"data file {path} is empty (or only whitespace)", "pass a file that holds training text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})",
                          f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path}") from None


def _txt_lines(path: Path) -> list[str]:
    """One document per line, as ``datasets``' text loader gives them (universal newlines, blank lines kept)."""
    return [line.rstrip("\n") for line in io.StringIO(_read_utf8(path), newline=None)]


def _json_texts(path: Path, field: str) -> list[str]:
    """``field`` of every record of a JSON Lines file or a JSON array, checked to be a string."""
    text = _read_utf8(path)
    if text.lstrip().startswith("["):  # one JSON array, as ``datasets`` also accepts
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})", _JSON_HINT) from None
        records = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # "\n" only: JSON strings may hold U+2028 and friends
            if line.strip():
                try:
                    records.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{n}: not valid JSON ({err.msg}, column {err.colno})", _JSON_HINT) from None
    texts = []
    for where, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {_JSON_TYPES[type(record)]}", _JSON_HINT)
        if field not in record:
            raise ConfigError(f"{where}: no {field!r} field (fields: {', '.join(record) or 'none'})",
                              "pass --text-field NAME to read another field")
        if not isinstance(record[field], str):
            raise ConfigError(f"{where}: field {field!r} is {_JSON_TYPES[type(record[field])]}, not a string",
                              "store the training text as a JSON string")
        texts.append(record[field])
    if not any(t.strip() for t in texts):
        raise ConfigError(f"data file {path} holds no text: every {field!r} is empty", "pass a file that holds training text")
    return texts


def _hub_texts(name: str, field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # hub errors come in many classes
        raise ConfigError(f"dataset {name!r} is not a local file and could not be loaded: {err}",
                          "pass local json/jsonl/txt files with --data") from err
    if field not in ds.column_names:
        raise ConfigError(f"data has no {field!r} field (columns: {ds.column_names})", "pass --text-field NAME")
    return list(ds[field])


def pack(texts, tokenizer, seq_len: int, bos: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the tail is dropped.

    ``bos``: every block starts with this token and holds seq_len - 1 of text (Gemma
    reads a sequence without its <bos> badly: 6.45 vs 4.36 nats on stdlib text).
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    width = seq_len - (bos is not None)
    n = len(ids) // width if width > 0 else 0
    if n == 0:
        raise ConfigError(f"the data holds {len(ids)} tokens, fewer than one block of {seq_len}", "add data or raise --seq-len")
    blocks = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    return blocks if bos is None else torch.cat([torch.full((n, 1), bos, dtype=torch.long), blocks], dim=1)


def pad_documents(texts, tokenizer, seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per document: (ids, labels), both (N, L), L the longest document cut at ``seq_len`` tokens.

    For tasks scored per document (the federated relatives), where :func:`pack` would run
    documents together. Each row is right-padded with ``pad``: under causal attention the
    padding sits after the document and changes no logit that is scored. ``labels`` are the
    ids, unshifted as in transformers' ``labels``, with ``IGNORE`` at the padding.
    """
    if not texts:
        raise ConfigError("no documents to tokenize", "pass at least one document")
    ids = [row[:seq_len] for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    width = max(len(row) for row in ids)
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return x, labels


class BlockSampler:
    """Deterministic shuffled batches, resumable from (epoch, index)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        if len(blocks) < batch_size:
            raise ConfigError(f"{len(blocks)} training blocks < batch size {batch_size}", "lower --batch-size or add data")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.index = epoch, index
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def next(self) -> torch.Tensor:
        if self.index + self.batch_size > len(self.blocks):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        batch = self.blocks[self._order[self.index : self.index + self.batch_size]]
        self.index += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}
