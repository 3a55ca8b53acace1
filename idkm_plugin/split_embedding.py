"""Mixed precision inside one embedding: the rows of frequent tokens and the rest as two nn.Embedding tables.

A word embedding's rows matter in proportion to how often their tokens occur (an embedding row's gradient,
and its Hessian, are sums over its occurrences), and a few thousand tokens make up almost all of a text.
`split_embedding(model, name, token_counts, n_frequent)` replaces the embedding `name` with a
`FrequencySplitEmbedding` whose children `frequent` (the `n_frequent` most counted rows) and `rare` (the rest)
are ordinary nn.Embedding modules: every flow clusters them as two layers, so a ModelConfig gives each its own
bits (`by_name: {<name>.frequent: ..., <name>.rare: ...}`), and conversion, `size_report` and
`save_palettized` / `load_palettized` treat them as any two embeddings. The module stores the sorted frequent
token ids (int16 when the vocabulary allows, 2 bytes per frequent token); before clustering it computes exactly
the original embedding.
"""
from __future__ import annotations

import torch
from torch import nn


class FrequencySplitEmbedding(nn.Module):
    """ids [...] (int) -> rows [..., dim]: `frequent` [n_frequent, dim] holds the rows of the sorted token ids
    `frequent_ids` [n_frequent], `rare` [num_embeddings - n_frequent, dim] every other row in id order."""

    def __init__(self, frequent_ids: torch.Tensor, num_embeddings: int, embedding_dim: int,
                 padding_idx: int | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        given = torch.as_tensor(frequent_ids)
        ids = given.flatten().long().unique()  # sorted
        if len(ids) != given.numel():
            raise ValueError("FrequencySplitEmbedding: frequent_ids has repeated ids")
        if not 0 < len(ids) < num_embeddings or int(ids[0]) < 0 or int(ids[-1]) >= num_embeddings:
            span = f" in [{int(ids[0])}, {int(ids[-1])}]" if len(ids) else ""
            raise ValueError(f"FrequencySplitEmbedding: frequent_ids must be 1..{num_embeddings - 1} distinct ids "
                             f"in [0, {num_embeddings}); got {len(ids)}{span}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        index_dtype = torch.int16 if num_embeddings <= torch.iinfo(torch.int16).max + 1 else torch.int32
        self.register_buffer("frequent_ids", ids.to(index_dtype))
        n = len(ids)
        pad_frequent = pad_rare = None
        if padding_idx is not None:  # the padding row keeps its role (no gradient) in whichever table holds it
            hit, index = self._split_index(torch.tensor(padding_idx))
            pad_frequent, pad_rare = (int(index), None) if hit else (None, int(index))
        self.frequent = nn.Embedding(n, embedding_dim, padding_idx=pad_frequent, dtype=dtype)
        self.rare = nn.Embedding(num_embeddings - n, embedding_dim, padding_idx=pad_rare, dtype=dtype)

    def _split_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [...] -> (is_frequent [...] bool, index into `frequent` where True, into `rare` where False).

        Built from `frequent_ids` with Core ATen ops only (scatter, cumsum, indexing), so exported programs run it;
        O(num_embeddings) per call."""
        frequent = self.frequent_ids.long()
        flag = torch.zeros(self.num_embeddings, dtype=torch.long, device=frequent.device)
        flag = flag.scatter(0, frequent, torch.ones_like(frequent))  # 1 at the frequent ids
        below = (torch.cumsum(flag, 0) - flag)[ids]  # how many frequent ids are < id
        hit = flag[ids].bool()
        return hit, torch.where(hit, below, ids - below)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, frequent_ids: torch.Tensor) -> "FrequencySplitEmbedding":
        """The split of `embedding` (its rows copied; the same outputs) with `frequent_ids` [n] as the frequent rows."""
        for attr, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(embedding, attr) != default:
                raise ValueError(f"FrequencySplitEmbedding: {attr}={getattr(embedding, attr)!r} is not supported "
                                 f"(allowed: {default!r})")
        weight = embedding.weight.detach()
        split = cls(frequent_ids, *weight.shape, padding_idx=embedding.padding_idx, dtype=weight.dtype)
        split.to(weight.device)
        hit, _ = split._split_index(torch.arange(len(weight), device=weight.device))
        with torch.no_grad():
            split.frequent.weight.copy_(weight[hit])
            split.rare.weight.copy_(weight[~hit])
        return split

    def to_embedding(self) -> nn.Embedding:
        """The one nn.Embedding these two tables make (float modules only)."""
        hit, _ = self._split_index(torch.arange(self.num_embeddings, device=self.frequent_ids.device))
        weight = self.frequent.weight.new_empty(self.num_embeddings, self.embedding_dim)
        with torch.no_grad():  # the inverse of from_embedding's copies
            weight[hit] = self.frequent.weight
            weight[~hit] = self.rare.weight
        return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=self.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hit, index = self._split_index(ids)
        frequent = self.frequent(torch.where(hit, index, 0))
        rare = self.rare(torch.where(hit, 0, index))
        return torch.where(hit.unsqueeze(-1), frequent, rare)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, frequent={len(self.frequent_ids)}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


def most_frequent(token_counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ids [n] of the n largest `token_counts` [num_embeddings], most counted first; equal counts keep id order
    (a stable sort), so the choice does not depend on the sort implementation."""
    return torch.sort(-torch.as_tensor(token_counts).flatten().double(), stable=True).indices[:n]


def split_embedding(model: nn.Module, name: str, token_counts: torch.Tensor,
                    n_frequent: int) -> FrequencySplitEmbedding:
    """Replace the nn.Embedding `name` of `model` (in place) by its FrequencySplitEmbedding with the `n_frequent`
    rows of the largest `token_counts` [num_embeddings] as `frequent` (ties: the smaller id); returns it.

    An embedding whose weight another module shares (a tied lm_head) is refused: splitting would untie it.
    """
    embedding = model.get_submodule(name)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"split_embedding: {name!r} is {type(embedding).__name__}, not nn.Embedding")
    rows = embedding.num_embeddings
    counts = torch.as_tensor(token_counts).flatten()
    if counts.numel() != rows:
        raise ValueError(f"split_embedding: {name!r} has {rows} rows but token_counts has {counts.numel()} entries")
    if not 0 < n_frequent < rows:
        raise ValueError(f"split_embedding: {name!r}: n_frequent={n_frequent}; allowed 1..{rows - 1}")
    for other_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p is embedding.weight and module is not embedding:
                raise ValueError(f"split_embedding: {name!r} shares its weight with {other_name}.{p_name} "
                                 "(tied); splitting would untie them")
    split = FrequencySplitEmbedding.from_embedding(embedding, most_frequent(counts, n_frequent))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, split)
    return split
