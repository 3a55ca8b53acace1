"""Decoder LLMs from transformers (LLaMA-style `...ForCausalLM`) to ExecuTorch and Core ML.

    from idkm_plugin.export.llm_export import llm_to_executorch, llm_to_coreml, generate_pte
    llm_to_executorch(deployed, "smollm2.pte", max_cache_len=256)      # forward(input_ids [1, 1], cache_position [1])
    tokens = generate_pte("smollm2.pte", prompt_ids, max_new_tokens=20) # greedy, under executorch.runtime
    llm_to_coreml(deployed, "smollm2.mlpackage", seq_len=64)           # forward(input_ids [1, 64]) -> logits

ExecuTorch: `StaticCacheLM` wraps the model with a transformers `StaticCache` whose key / value tensors are buffers
of the wrapper, so the program keeps the KV cache as mutable state (only its shape is stored) and decodes one token
per call; the palettized weights stay packed codes + LUT in the file (a tied embedding / head once), decoded by the
program (see `executorch_export`).
Core ML: `CausalMaskLM` hands the model a precomputed additive causal mask [1, 1, T, T] and positions [1, T], so
transformers' mask code (which uses `torch.diff`, missing from coremltools 9.0) is never traced; each palettized
weight becomes one `constexpr_lut_to_dense` (see `coreml_export`).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .progress import stage

__all__ = ["CausalMaskLM", "StaticCacheLM", "generate_pte", "llm_to_coreml", "llm_to_executorch"]


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no .config); LLM export takes a "
                         "transformers `...ForCausalLM`; export other models with to_executorch / to_coreml")
    return config.get_text_config()


class StaticCacheLM(nn.Module):
    """forward(input_ids int64 [batch, T], cache_position int64 [T]) -> logits [batch, T, vocab], with the KV cache
    a transformers `StaticCache` of max_cache_len positions held as this module's buffers (key_cache_i /
    value_cache_i [batch, kv_heads, max_cache_len, head_dim], cumulative_length_i []).

    The tokens go to positions cache_position[0], cache_position[0] + 1, ...; generation calls it with one token at
    a time (T = 1) at positions 0, 1, 2, ...
    """

    def __init__(self, model: nn.Module, max_cache_len: int, batch_size: int = 1) -> None:
        super().__init__()
        from transformers import StaticCache
        from transformers.configuration_utils import get_head_shapes

        config = _text_config(model)
        if not getattr(config, "use_cache", True):
            raise ValueError(f"{type(model).__name__}: config.use_cache is False; a KV-cache export needs it True")
        if getattr(config, "sliding_window", None) is not None and getattr(config, "layer_types", None):
            raise ValueError(f"{type(model).__name__} has sliding-window layers; the static-cache export supports "
                             "full attention only")
        self.model = model
        self.max_cache_len = int(max_cache_len)
        self.cache = StaticCache(max_cache_len=self.max_cache_len, config=config)
        num_heads, head_dim = get_head_shapes(config)
        dtype = next(model.parameters()).dtype
        self.cache.early_initialization(batch_size, num_heads, head_dim, dtype, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            # the cache reads its tensors through these buffers (under torch.export: the traced ones), so each is
            # one program input, mutated in place
            layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, attention_mask=None)
        return out.logits


def llm_to_executorch(model: nn.Module, path: str | os.PathLike, max_cache_len: int = 128, delegate: bool = True,
                      progress: bool = True) -> int:
    """Write a .pte of the decoder LLM `model` (palettized or float) that generates token by token: method
    "forward"(input_ids int64 [1, 1], cache_position int64 [1]) -> logits float [1, 1, vocab], KV cache of
    max_cache_len positions inside the program. Returns the file's size in bytes. progress: one line per stage.

    Run it with `generate_pte`, or `Runtime.get().load_program(path).load_method("forward")`.
    """
    from .executorch_export import lower_to_pte

    with stage("to_executorch: static KV cache wrapper", progress):
        wrapped = StaticCacheLM(model, max_cache_len).eval()
    example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return lower_to_pte(wrapped, example, path, delegate=delegate, progress=progress)


def generate_pte(path: str | os.PathLike, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy generation under `executorch.runtime` with a .pte from `llm_to_executorch`: feeds the prompt one
    token at a time, then the argmax of each step's logits. Returns the max_new_tokens new token ids."""
    from .executorch_export import load_pte_method

    method = load_pte_method(path)
    tokens, new = list(prompt_ids), []
    if not tokens:
        raise ValueError("generate_pte needs a prompt of at least one token")
    for position in range(len(tokens) + max_new_tokens - 1):
        token = tokens[position] if position < len(tokens) else new[-1]
        logits = method.execute([torch.tensor([[token]], dtype=torch.long),
                                 torch.tensor([position], dtype=torch.long)])[0]
        if position >= len(tokens) - 1:
            new.append(int(logits[0, -1].argmax()))
    return new


_MASKED = -30000.0  # exp(-30000 + any attention score) is 0; Core ML's float16 holds it (finfo.min would overflow)


class CausalMaskLM(nn.Module):
    """forward(input_ids int64 [batch, seq_len]) -> logits [batch, seq_len, vocab]: the model called without a KV
    cache, with a precomputed additive causal mask (float [1, 1, seq_len, seq_len]: 0 where a token may attend,
    -30000 elsewhere: masked, and finite in float16) and positions (int64 [1, seq_len]), so that transformers builds no mask itself."""

    def __init__(self, model: nn.Module, seq_len: int) -> None:
        super().__init__()
        _text_config(model)
        self.model = model
        dtype = next(model.parameters()).dtype
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        mask = torch.zeros(seq_len, seq_len, dtype=dtype).masked_fill(~allowed, _MASKED)
        self.register_buffer("causal_mask", mask.view(1, 1, seq_len, seq_len), persistent=False)
        self.register_buffer("positions", torch.arange(seq_len).view(1, seq_len), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask.expand(input_ids.shape[0], 1, -1, -1)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=self.positions,
                          use_cache=False).logits


def llm_to_coreml(model: nn.Module, path: Optional[str | os.PathLike] = None, seq_len: int = 64,
                  progress: bool = True, **convert_kwargs: Any):
    """Convert the decoder LLM `model` to a Core ML ML program (iOS18+): input "input_ids" int32 [1, seq_len],
    output the logits [1, seq_len, vocab] (causal: position t sees tokens 0..t). Every palettized weight is one
    `constexpr_lut_to_dense` (a tied embedding / head one, shared). convert_kwargs go to `to_coreml` /
    `coremltools.convert`. Returns the MLModel (saved to `path` when given)."""
    from .coreml_export import _require_coremltools, to_coreml

    ct = _require_coremltools()
    import numpy as np  # coremltools' dependency
    convert_kwargs.setdefault("inputs", [ct.TensorType(name="input_ids", shape=(1, seq_len), dtype=np.int32)])
    convert_kwargs.setdefault("outputs", [ct.TensorType(name="logits")])
    with stage("to_coreml: causal-mask wrapper", progress):
        wrapped = CausalMaskLM(model, seq_len).eval()
    example = (torch.zeros(1, seq_len, dtype=torch.long),)
    return to_coreml(wrapped, example, path, progress=progress, **convert_kwargs)
