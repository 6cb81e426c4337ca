"""Training text: local json/jsonl/txt files (or a hub dataset when online) -> packed token blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from hetune.errors import ConfigError

LOCAL_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json"}


def load_text_dataset(sources: list[str] | tuple[str, ...], text_field: str = "text"):
    """A ``datasets.Dataset`` with a ``text`` column, from local files or one hub dataset name."""
    import datasets

    if not sources:
        raise ConfigError("no training data given", "pass --data FILE (json, jsonl or txt)")
    paths = [Path(s) for s in sources]
    local = [p for p in paths if p.suffix in LOCAL_FORMATS or p.exists()]
    if local:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"data file(s) not found: {', '.join(missing)}", "check the --data paths")
        kinds = {LOCAL_FORMATS.get(p.suffix) for p in paths}
        if None in kinds or len(kinds) != 1:
            raise ConfigError(f"data files must all be .txt or all .json/.jsonl, got {[p.name for p in paths]}", "convert them to one format")
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in paths], split="train")
    else:
        try:
            ds = datasets.load_dataset(sources[0], split="train")
        except Exception as err:  # hub errors come in many classes
            raise ConfigError(f"dataset {sources[0]!r} is not a local file and could not be loaded: {err}",
                              "pass local json/jsonl/txt files with --data") from err
    if text_field not in ds.column_names:
        raise ConfigError(f"data has no {text_field!r} field (columns: {ds.column_names})", "pass --text-field NAME")
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def pack(texts, tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the tail is dropped."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the data holds {len(ids)} tokens, fewer than one block of {seq_len}", "add data or lower --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


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
