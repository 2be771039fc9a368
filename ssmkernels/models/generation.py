"""Generation: (chunked) prefill through the cache, then one-token decode steps.

Batched prompts of different lengths are **left-padded**: every row then ends at the same
position, so one decode step serves all rows with a single position counter. Padding is exact:
Mamba blocks zero padded positions before and after the conv (their states stay zero, as if the
row started later) and attention never attends to padded keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .model import HybridLM


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths -> ``(input_ids (b, L), attention_mask (b, L))``, left-padded."""
    if not prompts:
        raise ValueError("prompts must hold at least one sequence")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - r.numel():] = r
        mask[i, longest - r.numel():] = 1
    return ids.to(device), mask.to(device)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens ``(b,)`` from last-position ``logits (b, vocab)``: argmax when temperature is 0."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: "HybridLM", input_ids: Union[Tensor, Sequence[Sequence[int]]], max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, attention_mask: Optional[Tensor] = None,
             eos_token_id: Optional[int] = None, pad_token_id: int = 0,
             prefill_chunk_size: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cuda_graph: bool = False) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`HybridLM`.
        input_ids: ``(b, l)`` int64 prompts (with ``attention_mask`` when left-padded), or a list
            of token lists of different lengths (left-padded here with ``pad_token_id``).
        max_new_tokens: tokens to add per row.
        temperature: 0 (default) is greedy; otherwise sample from ``softmax(logits / temperature)``,
            restricted to the ``top_k`` most likely tokens when given.
        attention_mask: ``(b, l)``, 1 = token, 0 = left padding.
        eos_token_id: rows that produced it continue with ``pad_token_id``; generation stops early
            once every row has (the result is then shorter than ``l + max_new_tokens``).
        prefill_chunk_size: feed the prompt through the cache in chunks of this many tokens
            (chunked prefill) instead of at once.
        generator: random generator for sampling.
        cuda_graph: run the decode steps as a replayed CUDA graph (CUDA only; see :class:`DecodeGraph`).

    Returns:
        ``(b, l + new)`` int64: the (padded) prompts followed by the generated tokens.
    """
    device = model.embeddings.weight.device
    if not isinstance(input_ids, Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a tensor input_ids; token lists are padded here")
        input_ids, attention_mask = left_pad(input_ids, pad_token_id, device)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if bool((attention_mask.long().diff(dim=1) < 0).any()):
            raise ValueError("attention_mask must be left padding: zeros before the ones of each row")
        if bool(attention_mask.all()):
            attention_mask = None
    b, l = input_ids.shape
    if max_new_tokens == 0:
        return input_ids
    cache = model.new_cache(b, l + max_new_tokens)

    step = l if not prefill_chunk_size else int(prefill_chunk_size)
    for start in range(0, l, step):
        chunk_mask = None if attention_mask is None else attention_mask[:, start:start + step]
        logits = model(input_ids[:, start:start + step], cache=cache, attention_mask=chunk_mask, logits_to_keep=1)

    graph = None
    if cuda_graph and max_new_tokens > 1:
        graph = DecodeGraph(model, cache)

    tokens = [sample(logits[:, -1], temperature, top_k, generator)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            finished |= tokens[-1] == eos_token_id
            if bool(finished.all()):
                break
        current = tokens[-1][:, None]
        logits = graph(current) if graph is not None else model(current, cache=cache)
        nxt = sample(logits[:, -1], temperature, top_k, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


class DecodeGraph:
    """One decode step of ``model`` on ``cache``, captured once as a CUDA graph and replayed per token.

    The cache is switched to static mode (:meth:`HybridCache.set_static`): the step reads its
    position from a device tensor and attends over the whole preallocated KV cache under a mask,
    so nothing in the graph depends on host values. Mamba blocks update their states in place
    (``causal_conv1d_update``, ``selective_state_update``), which replays as is. Warm-up runs
    happen on a copy of the states, which are restored before the first real step.

    Usage: ``graph = DecodeGraph(model, cache)``, then ``logits = graph(next_ids (b, 1))`` per step
    (the returned tensor is the graph's static output: copy it to keep it past the next step).
    """

    def __init__(self, model: "HybridLM", cache, warmup: int = 2):
        device = model.embeddings.weight.device
        if device.type != "cuda":
            raise RuntimeError(f"CUDA-graph decode needs the model on a CUDA device, it is on {device}")
        self.model, self.cache = model, cache
        cache.set_static(True)
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        saved = [t.clone() for t in cache.tensors()]
        saved_position = cache.position.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # lazy init, autotuning and allocator warm-up outside the graph
                model.forward_body(self.input_ids, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = model.forward_body(self.input_ids, cache)
        for t, s in zip(cache.tensors(), saved):
            t.copy_(s)
        cache.position.copy_(saved_position)

    def __call__(self, input_ids: Tensor) -> Tensor:
        """Advance the cache by the tokens ``input_ids (b, 1)``; returns logits ``(b, 1, vocab)``."""
        self.cache.begin(1, None)  # overflow check, position and key_valid for this step
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits
