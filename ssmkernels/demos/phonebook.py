"""Phonebook recall (issue 9): does the hybrid look numbers up in context where pure Mamba-2 cannot?

The seed study (Waleffe et al., "An Empirical Study of Mamba-based Language Models") reports
that the Mamba-2-Hybrid recalls phonebook entries near perfectly, also beyond its training
context, while a pure Mamba-2 model struggles. This demo reproduces the experiment at small
scale from scratch: four models of matched parameter count, trained on the same synthetic data
for the same number of steps, then evaluated at 1x, 2x and 4x the training context.

Task (all token ids; one sequence)::

    BOS  name SEP number END  name SEP number END ...   QUERY name SEP number END  [QUERY ...]  PAD...
         '------------- book of N entries ----------'   '------- n_queries look-ups --------'

Names are ``name_len`` tokens from ``n_name_tokens`` name tokens (distinct within a book),
numbers ``number_len`` digit tokens, both drawn afresh for every book. The queried names are
distinct entries of the book. Loss and accuracy count only the answer digits after each query's
``SEP``; a query is recalled when all its digits are right (teacher-forced argmax, which equals
greedy decoding of that number: the first wrong digit is wrong either way). Each look-up is
scored given the true text before it (earlier look-ups included). Training books hold between
``n_queries`` and the most entries that fit the training context (drawn per sequence); the
evaluation books fill their context, so 2x and 4x contexts hold about 2x and 4x more entries.
Every batch is a function of ``(seed, split, context length, step)``: all models see the same data.

Models (``PATTERNS``; layer patterns of :class:`ssmkernels.models.HybridLM`):

- ``hybrid``            ``M-M*-M-``   3 Mamba-2, 1 attention (no positions), 3 MLP blocks
- ``mamba2``            ``M-MM-M-``   the same with the attention block replaced by Mamba-2
- ``transformer-nope``  ``*-*-*-*-``  attention without positional encoding, on HybridLM
- ``transformer-rope``  ``*-*-*-*-``  the same blocks with rotary positions (:class:`RopeTransformerLM`,
  defined here; rotary positions are defined at any length, so 2x/4x contexts need nothing special)

Sizes: ``toy`` (CPU, reference backend, well under a minute for all four models; the numbers
mean little) and ``small`` (about 3.2M parameters per model, 512-token training context, meant
for one H100 in a few minutes; its run time has not been measured yet).

Run: ``python -m ssmkernels demo phonebook --size toy`` (CPU) or ``--size small`` (GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- task

PAD, BOS, SEP, END, QUERY = 0, 1, 2, 3, 4
DIGIT0 = 5  # digit d is token DIGIT0 + d
NAME0 = DIGIT0 + 10  # name token k is NAME0 + k
SPLITS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class PhonebookBatch:
    """``tokens (b, L)`` int64; ``answer_mask (b, L)`` bool, True at answer digits;
    ``n_entries (b,)`` book sizes. Rows are right-padded with ``PAD`` after the last query."""

    tokens: Tensor
    answer_mask: Tensor
    n_entries: Tensor

    def to(self, device, non_blocking: bool = False) -> "PhonebookBatch":
        return PhonebookBatch(*(t.to(device, non_blocking=non_blocking)
                                for t in (self.tokens, self.answer_mask, self.n_entries)))


@dataclass(frozen=True)
class PhonebookTask:
    """The synthetic phonebook: sizes of names, numbers and queries.

    Args:
        n_name_tokens: distinct name tokens; names are ``name_len`` of them, so there are
            ``n_name_tokens ** name_len`` names, which bounds the book size.
        name_len: tokens per name.
        number_len: digits per number.
        n_queries: look-ups at the end of every sequence (distinct entries of the book).
    """

    n_name_tokens: int = 16
    name_len: int = 2
    number_len: int = 3
    n_queries: int = 1

    def __post_init__(self) -> None:
        for name in ("n_name_tokens", "name_len", "number_len", "n_queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PhonebookTask.{name} must be a positive int, got {value!r}")

    @property
    def vocab_size(self) -> int:
        return NAME0 + self.n_name_tokens

    @property
    def n_names(self) -> int:
        return self.n_name_tokens ** self.name_len

    @property
    def entry_len(self) -> int:
        """Tokens of one book entry: ``name SEP number END``."""
        return self.name_len + self.number_len + 2

    @property
    def query_len(self) -> int:
        """Tokens of one look-up: ``QUERY name SEP number END``."""
        return self.entry_len + 1

    def max_entries(self, context_len: int) -> int:
        """The largest book that fits ``context_len`` tokens with its queries."""
        n = (context_len - 1 - self.n_queries * self.query_len) // self.entry_len
        if n < self.n_queries:
            raise ValueError(f"context_len {context_len} holds {max(n, 0)} entries; {self.n_queries} queries "
                             f"need at least {self.n_queries} (entry {self.entry_len} tokens, "
                             f"query {self.query_len} tokens)")
        if n > self.n_names:
            raise ValueError(f"context_len {context_len} holds {n} entries but there are only {self.n_names} "
                             f"distinct names ({self.n_name_tokens} tokens ** {self.name_len}); "
                             f"raise n_name_tokens or name_len")
        return n

    def answer_offsets(self) -> np.ndarray:
        """Positions of the answer digits inside one look-up."""
        start = 1 + self.name_len + 1
        return np.arange(start, start + self.number_len)

    def sample(self, batch_size: int, context_len: int, seed: int, index: int = 0, split: str = "train",
               n_entries: int | tuple[int, int] | None = None) -> PhonebookBatch:
        """A deterministic batch: the same ``(seed, split, context_len, index)`` gives the same tokens.

        Args:
            batch_size: sequences in the batch.
            context_len: tokens per sequence ``L`` (padded with ``PAD`` after the queries).
            seed, index, split: select the random stream (``split`` is ``"train"`` or ``"eval"``).
            n_entries: book size: ``None`` fills the context (:meth:`max_entries`), an int fixes
                it, ``(low, high)`` draws it uniformly (inclusive) per sequence.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        most = self.max_entries(context_len)
        if n_entries is None:
            low = high = most
        elif isinstance(n_entries, int):
            low = high = n_entries
        else:
            low, high = n_entries
        if not self.n_queries <= low <= high <= most:
            raise ValueError(f"n_entries {n_entries!r} must lie in [{self.n_queries}, {most}] for "
                             f"context_len {context_len}")
        rng = np.random.default_rng([seed, SPLITS[split], context_len, index])
        b, q, e = batch_size, self.n_queries, self.entry_len
        sizes = rng.integers(low, high + 1, size=b)
        # Every row draws `high` distinct names and numbers; row r uses the first sizes[r] of them.
        ids = np.stack([rng.choice(self.n_names, size=high, replace=False) for _ in range(b)])  # (b, high)
        powers = self.n_name_tokens ** np.arange(self.name_len - 1, -1, -1)
        names = (ids[..., None] // powers) % self.n_name_tokens + NAME0  # (b, high, name_len)
        numbers = rng.integers(0, 10, size=(b, high, self.number_len)) + DIGIT0
        sep, end = np.full((b, high, 1), SEP), np.full((b, high, 1), END)
        book = np.concatenate([names, sep, numbers, end], axis=2)  # (b, high, entry_len)
        # The queried entries: q distinct ones among each row's first sizes[r].
        keys = np.where(np.arange(high)[None] < sizes[:, None], rng.random((b, high)), np.inf)
        asked = np.argsort(keys, axis=1, kind="stable")[:, :q]  # (b, q)
        rows = np.arange(b)[:, None]
        queries = np.concatenate([np.full((b, q, 1), QUERY), book[rows, asked]], axis=2)  # (b, q, query_len)

        tokens = np.full((b, context_len), PAD, dtype=np.int64)
        tokens[:, 0] = BOS
        tokens[:, 1:1 + high * e] = book.reshape(b, high * e)
        first_query = 1 + sizes * e  # (b,)
        positions = np.arange(context_len)[None]
        tokens[positions >= first_query[:, None]] = PAD  # drop the unused entries
        cols = first_query[:, None] + np.arange(q * self.query_len)[None]  # (b, q * query_len)
        tokens[rows, cols] = queries.reshape(b, q * self.query_len)
        mask = np.zeros((b, context_len), dtype=bool)
        answer_cols = (np.arange(q)[:, None] * self.query_len + self.answer_offsets()[None]).ravel()
        mask[rows, first_query[:, None] + answer_cols[None]] = True
        return PhonebookBatch(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(sizes))


# ----------------------------------------------------------------------------- models

PATTERNS = {
    "hybrid": "M-M*-M-",
    "mamba2": "M-MM-M-",
    "transformer-nope": "*-*-*-*-",
    "transformer-rope": "*-*-*-*-",
}
MODEL_NAMES = tuple(PATTERNS)
DESCRIPTIONS = {
    "hybrid": "Mamba-2 + 1 attention (HybridLM)",
    "mamba2": "pure Mamba-2 (HybridLM)",
    "transformer-nope": "attention, no positions (HybridLM)",
    "transformer-rope": "attention + rotary positions (demo class)",
}


class RopeTransformerLM(nn.Module):
    """A Transformer with rotary positions, block for block like ``HybridLM`` with pattern ``*-*-...``.

    Embedding -> ``n_pairs`` x (pre-norm causal GQA attention with RoPE, pre-norm MLP with squared
    ReLU) -> RMSNorm -> LM head; no biases. The parameter count equals HybridLM's for the same
    sizes (RoPE has no parameters), so the two Transformers differ only in positional encoding.
    Rotary angles are computed for whatever length comes in.
    """

    def __init__(self, vocab_size: int, d_model: int, n_pairs: int, n_heads: int, n_kv_heads: int,
                 mlp_hidden: int, norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 initializer_range: float = 0.02):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2 or n_heads % n_kv_heads:
            raise ValueError(f"RopeTransformerLM: d_model {d_model} / n_heads {n_heads} must be an even head "
                             f"dim and n_kv_heads {n_kv_heads} must divide n_heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.rope_base = rope_base
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList()
        for _ in range(n_pairs):
            self.layers.append(nn.ModuleDict(dict(
                norm=nn.RMSNorm(d_model, eps=norm_eps),
                q_proj=nn.Linear(d_model, n_heads * self.head_dim, bias=False),
                k_proj=nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False),
                v_proj=nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False),
                o_proj=nn.Linear(n_heads * self.head_dim, d_model, bias=False))))
            self.layers.append(nn.ModuleDict(dict(
                norm=nn.RMSNorm(d_model, eps=norm_eps),
                up_proj=nn.Linear(d_model, mlp_hidden, bias=False),
                down_proj=nn.Linear(mlp_hidden, d_model, bias=False))))
        self.norm_f = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=initializer_range)
            scale = 1.0 / math.sqrt(4 * n_pairs)  # as HybridLM: 1/sqrt(2 * layers)
            for layer in self.layers:
                for name in ("o_proj", "down_proj"):
                    if name in layer:
                        layer[name].weight.mul_(scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rotate(self, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = t.shape[-1] // 2
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def forward(self, input_ids: Tensor) -> Tensor:
        b, l = input_ids.shape
        hidden = self.embeddings(input_ids)
        half = self.head_dim // 2
        inv_freq = self.rope_base ** (-torch.arange(half, device=hidden.device, dtype=torch.float32) / half)
        angles = torch.arange(l, device=hidden.device, dtype=torch.float32)[:, None] * inv_freq[None]
        cos, sin = angles.cos(), angles.sin()  # (l, head_dim / 2)
        for layer in self.layers:
            u = layer["norm"](hidden)
            if "q_proj" in layer:
                q = layer["q_proj"](u).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)
                k = layer["k_proj"](u).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
                v = layer["v_proj"](u).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)
                q = self._rotate(q.float(), cos, sin).to(v.dtype)
                k = self._rotate(k.float(), cos, sin).to(v.dtype)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                     enable_gqa=self.n_kv_heads != self.n_heads)
                hidden = hidden + layer["o_proj"](out.transpose(1, 2).reshape(b, l, -1))
            else:
                hidden = hidden + layer["down_proj"](torch.square(F.relu(layer["up_proj"](u))))
        return self.lm_head(self.norm_f(hidden))


@dataclass(frozen=True)
class ModelDims:
    """Sizes shared by all four models (HybridConfig fields)."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    d_state: int
    headdim: int
    ngroups: int
    expand: int
    chunk_size: int
    mlp_hidden: int


def build_model(name: str, dims: ModelDims, vocab_size: int, backend: Optional[str] = None) -> nn.Module:
    """One of :data:`MODEL_NAMES` at ``dims``; HybridLM models call ssmkernels with ``backend``."""
    if name not in PATTERNS:
        raise ValueError(f"model must be one of {list(MODEL_NAMES)}, got {name!r}")
    pattern = PATTERNS[name]
    if name == "transformer-rope":
        return RopeTransformerLM(vocab_size, dims.d_model, pattern.count("*"), dims.n_heads, dims.n_kv_heads,
                                 dims.mlp_hidden)
    try:
        from ssmkernels.models import HybridConfig, HybridLM
    except ImportError as error:  # the reference model is a separate package of the library
        raise RuntimeError(f"the phonebook demo needs ssmkernels.models (HybridConfig, HybridLM): {error}") from error
    cfg = HybridConfig(pattern=pattern, vocab_size=vocab_size, backend=backend, **asdict(dims))
    return HybridLM(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class DemoSettings:
    """Everything a run depends on besides the seed, device and backend."""

    task: PhonebookTask
    dims: ModelDims
    train_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_train_entries: Optional[int] = None  # books of [min, max] entries in training; None: n_queries
    eval_factors: tuple[int, ...] = (1, 2, 4)
    eval_samples: int = 256
    eval_batch: int = 64
    log_every: int = 25

    @property
    def context_lengths(self) -> list[int]:
        return [self.train_len * f for f in self.eval_factors]

    def train_entries(self) -> tuple[int, int]:
        low = self.task.n_queries if self.min_train_entries is None else self.min_train_entries
        return low, self.task.max_entries(self.train_len)


SIZES = {
    # CPU, reference backend: ~50K parameters, 64-token books of <= 6 entries (4x: 33 entries).
    "toy": DemoSettings(
        task=PhonebookTask(n_name_tokens=16, name_len=2, number_len=3, n_queries=2),
        dims=ModelDims(d_model=32, n_heads=2, n_kv_heads=2, d_state=16, headdim=16, ngroups=1, expand=2,
                       chunk_size=16, mlp_hidden=128),
        train_len=64, batch_size=16, steps=40, lr=3e-3, warmup_steps=5, eval_samples=16, eval_batch=16,
        log_every=10),
    # One H100: ~3.2M parameters per model; 512-token contexts holding books of up to 54 entries and
    # 8 look-ups (2x: 118 entries, 4x: 246 entries); 2000 steps x 64 x 512 = 65.5M training tokens
    # per model. Not run yet: the expected few minutes on an H100 are an estimate, not a measurement.
    "small": DemoSettings(
        task=PhonebookTask(n_name_tokens=64, name_len=2, number_len=4, n_queries=8),
        dims=ModelDims(d_model=256, n_heads=4, n_kv_heads=4, d_state=64, headdim=64, ngroups=1, expand=2,
                       chunk_size=64, mlp_hidden=1024),
        train_len=512, batch_size=64, steps=2000, lr=2e-3, warmup_steps=200, eval_samples=512, eval_batch=64,
        log_every=100),
}


# ----------------------------------------------------------------------------- training and evaluation

def answer_logits_and_targets(logits: Tensor, batch: PhonebookBatch) -> tuple[Tensor, Tensor]:
    """Logits at the positions that predict an answer digit, and those digits: ``(k, V)``, ``(k,)``."""
    predict = batch.answer_mask[:, 1:]
    return logits[:, :-1][predict], batch.tokens[:, 1:][predict]


def answer_loss(logits: Tensor, batch: PhonebookBatch) -> Tensor:
    """Mean cross-entropy over the answer digits only."""
    chosen, targets = answer_logits_and_targets(logits, batch)
    return F.cross_entropy(chosen.float(), targets)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases, A_log, D, dt_bias) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per logging interval
    final_loss: float = float("nan")
    train_time_s: float = 0.0
    tokens: int = 0
    first_step_s: float = 0.0
    first_step_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Training throughput after the first step (which includes one-time costs: Triton
        compilation and autotuning, CUDA context and allocator warm-up)."""
        rest = self.train_time_s - self.first_step_s
        tokens = self.tokens - self.first_step_tokens
        if tokens <= 0 or rest <= 0:  # one step only
            return self.tokens / self.train_time_s if self.train_time_s > 0 else float("nan")
        return tokens / rest


def train(model: nn.Module, batches: Callable[[int], PhonebookBatch], steps: int, lr: float, warmup: int,
          weight_decay: float = 0.1, grad_clip: float = 1.0, device: torch.device | str = "cpu",
          precision: str = "fp32", log_every: int = 0, log: Optional[Callable[[str], None]] = None,
          name: str = "model") -> TrainResult:
    """AdamW on :func:`answer_loss`; ``batches(step)`` gives the (deterministic) batch of each step.

    Every ``log_every`` steps ``log`` gets a line with the step, the mean loss and answer-digit
    accuracy since the last line, and tokens/s (all tokens of the batches, padding included).
    """
    device = torch.device(device)
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    result = TrainResult()
    loss_sum = torch.zeros((), device=device)
    hit_sum = torch.zeros((), device=device)
    digit_count = torch.zeros((), device=device, dtype=torch.int64)
    interval_steps, interval_tokens = 0, 0
    _sync(device)
    start = interval_start = time.perf_counter()
    for step in range(steps):
        batch = batches(step).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with _autocast(device, precision):
            logits = model(batch.tokens)
        # Masked mean over all positions rather than boolean indexing: no host sync per step.
        predict = batch.answer_mask[:, 1:]
        targets = batch.tokens[:, 1:].masked_fill(~predict, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += loss.detach()
        hit_sum += ((logits[:, :-1].detach().argmax(-1) == targets) & predict).sum()
        digit_count += predict.sum()
        interval_steps += 1
        interval_tokens += batch.tokens.numel()
        result.tokens += batch.tokens.numel()
        if step == 0:
            _sync(device)
            result.first_step_s = time.perf_counter() - start
            result.first_step_tokens = batch.tokens.numel()
        last = step == steps - 1
        if last or (log_every and (step + 1) % log_every == 0):
            mean_loss = (loss_sum / interval_steps).item()  # synchronises
            now = time.perf_counter()
            result.losses.append(mean_loss)
            if log is not None and log_every:
                rate = interval_tokens / max(now - interval_start, 1e-9)
                log(f"[{name}] step {step + 1:>5}/{steps}  loss {mean_loss:7.4f}  "
                    f"digit-acc {(hit_sum / digit_count.clamp(min=1)).item():.3f}  {rate:>10,.0f} tok/s")
            loss_sum.zero_()
            hit_sum.zero_()
            digit_count.zero_()
            interval_steps, interval_tokens, interval_start = 0, 0, now
    _sync(device)
    result.train_time_s = time.perf_counter() - start
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    return result


@torch.no_grad()
def evaluate(model: nn.Module, task: PhonebookTask, context_len: int, samples: int, batch_size: int, seed: int,
             device: torch.device | str = "cpu", precision: str = "fp32") -> dict:
    """Exact-match recall on full books of ``context_len`` tokens (``eval`` split, fixed by ``seed``).

    Returns ``{"context_len", "entries", "queries", "accuracy" (all digits of a query right),
    "digit_accuracy"}``.
    """
    device = torch.device(device)
    model.eval()
    recalled = digits_right = queries = 0
    done, index = 0, 0
    while done < samples:
        size = min(batch_size, samples - done)
        batch = task.sample(size, context_len, seed, index=index, split="eval").to(device)
        with _autocast(device, precision):
            logits = model(batch.tokens)
        chosen, targets = answer_logits_and_targets(logits, batch)
        right = (chosen.argmax(-1) == targets).view(size, task.n_queries, task.number_len)
        recalled += int(right.all(-1).sum())
        digits_right += int(right.sum())
        queries += size * task.n_queries
        done += size
        index += 1
    model.train()
    return {"context_len": context_len, "entries": task.max_entries(context_len), "queries": queries,
            "accuracy": recalled / queries, "digit_accuracy": digits_right / (queries * task.number_len)}


# ----------------------------------------------------------------------------- the demo

def run_demo(settings: DemoSettings, models: Sequence[str] = MODEL_NAMES, seed: int = 0,
             device: torch.device | str = "cpu", backend: Optional[str] = None, precision: str = "fp32",
             log: Callable[[str], None] = print) -> dict:
    """Train and evaluate each model on the same data; returns the JSON-ready results."""
    device = torch.device(device)
    task = settings.task
    train_entries = settings.train_entries()

    def batches(step: int) -> PhonebookBatch:
        return task.sample(settings.batch_size, settings.train_len, seed, index=step, split="train",
                           n_entries=train_entries)

    contexts = settings.context_lengths
    for length in contexts:
        task.max_entries(length)  # fail before training when a context cannot hold its book
    log(f"phonebook: vocab {task.vocab_size}, entry {task.entry_len} tokens, {task.n_queries} queries; "
        f"training books of {train_entries[0]}..{train_entries[1]} entries in {settings.train_len} tokens; "
        f"evaluation at {', '.join(f'{c} ({task.max_entries(c)} entries)' for c in contexts)}")
    log(f"{settings.steps} steps x batch {settings.batch_size}, AdamW lr {settings.lr}, device {device}, "
        f"backend {backend or 'auto'}, precision {precision}")
    built = {}
    for name in models:
        torch.manual_seed(seed)  # every model starts from the same RNG state
        built[name] = build_model(name, settings.dims, task.vocab_size, backend)
        log(f"  {name:<17} {PATTERNS[name]:<9} {count_parameters(built[name]):>10,} parameters  "
            f"({DESCRIPTIONS[name]})")
    rows = []
    for name, model in built.items():
        model.to(device)
        torch.manual_seed(seed)
        trained = train(model, batches, settings.steps, settings.lr, settings.warmup_steps,
                        settings.weight_decay, settings.grad_clip, device, precision, settings.log_every, log,
                        name)
        evals = [evaluate(model, task, length, settings.eval_samples, settings.eval_batch, seed, device, precision)
                 for length in contexts]
        log(f"[{name}] trained in {trained.train_time_s:.1f} s ({trained.tokens_per_s:,.0f} tok/s); recall "
            + ", ".join(f"{e['accuracy']:.3f} @ {e['context_len']}" for e in evals))
        rows.append({
            "name": name, "pattern": PATTERNS[name], "description": DESCRIPTIONS[name],
            "parameters": count_parameters(model), "final_loss": trained.final_loss, "losses": trained.losses,
            "train_time_s": trained.train_time_s, "first_step_s": trained.first_step_s,
            "tokens_per_s": trained.tokens_per_s, "tokens": trained.tokens,
            "accuracy": {str(e["context_len"]): e["accuracy"] for e in evals},
            "digit_accuracy": {str(e["context_len"]): e["digit_accuracy"] for e in evals},
        })
        model.to("cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "demo": "phonebook", "seed": seed, "device": str(device), "gpu": gpu, "backend": backend,
        "precision": precision, "torch": torch.__version__, "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("task", "dims")},
                     "eval_factors": list(settings.eval_factors), "train_entries": list(train_entries)},
        "task": asdict(task), "dims": asdict(settings.dims),
        "context_lengths": contexts, "entries": {str(c): task.max_entries(c) for c in contexts},
        "models": rows,
    }


def format_table(results: dict) -> str:
    """Models x context lengths (exact-match recall), with parameters, train time and tokens/s."""
    contexts = [str(c) for c in results["context_lengths"]]
    factors = results["settings"]["eval_factors"]
    head = (f"{'model':<17} {'pattern':<9} {'params':>9} {'train s':>8} {'1st step':>8} {'tok/s':>10} {'loss':>7}  "
            + "  ".join(f"{'acc@' + c + ' (' + str(f) + 'x)':>16}" for c, f in zip(contexts, factors)))
    lines = [head, "-" * len(head)]
    for row in results["models"]:
        lines.append(f"{row['name']:<17} {row['pattern']:<9} {row['parameters']:>9,} {row['train_time_s']:>8.1f} "
                     f"{row['first_step_s']:>8.2f} "
                     f"{row['tokens_per_s']:>10,.0f} {row['final_loss']:>7.3f}  "
                     + "  ".join(f"{row['accuracy'][c]:>16.3f}" for c in contexts))
    entries = ", ".join(f"{c}: {results['entries'][c]}" for c in contexts)
    lines.append(f"(acc: exact-match recall of all digits of a number; book entries per context: {entries}; "
                 f"train s: all steps, 1st step included; tok/s: after the 1st step, padding included; "
                 f"{results['device']}{' ' + results['gpu'] if results['gpu'] else ''}, "
                 f"backend {results['backend'] or 'auto'})")
    return "\n".join(lines)


def save_plot(results: dict, path: str) -> Optional[str]:
    """Recall vs context length per model as a PNG; returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    contexts = results["context_lengths"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in results["models"]:
        ax.plot(contexts, [row["accuracy"][str(c)] for c in contexts], marker="o",
                label=f"{row['name']} ({row['parameters'] / 1e6:.2f}M)")
    ax.axvline(contexts[0], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens; dotted: training length)")
    ax.set_ylabel("phonebook recall (exact match)")
    ax.set_title(f"Phonebook recall, {results['settings']['steps']} steps, seed {results['seed']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssmkernels demo phonebook",
        description="Phonebook recall: hybrid vs pure Mamba-2 vs Transformers (with and without positions), "
                    "trained on the same data, evaluated at 1x/2x/4x the training context.")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="toy (CPU, seconds) or small (one H100, minutes); default: small on CUDA, else toy")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--backend", choices=["reference", "triton", "cuda"], default=None,
                        help="ssmkernels backend of the HybridLM models (default: reference on CPU, "
                             "fastest available on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the size's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and initialisation (default 0)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help=f"comma-separated subset of {','.join(MODEL_NAMES)}")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train-len", type=int, default=None, help="training context length in tokens")
    parser.add_argument("--eval-samples", type=int, default=None, help="books per evaluated context length")
    parser.add_argument("--log-every", type=int, default=None, help="steps between progress lines")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch during the demo (default on CPU: 1; the toy models are too small "
                             "to gain from more, and idle OpenMP threads slow a shared machine down badly)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the results as JSON to PATH ('-' or no PATH: stdout; the table and "
                             "progress then go to stderr)")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write recall vs context length as a PNG")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ssmkernels demo phonebook [options]``; returns the exit code."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    out = sys.stderr if args.json == "-" else sys.stdout

    def log(line: str) -> None:
        print(line, file=out, flush=True)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda asked for, but torch sees no CUDA GPU")
        return 2
    size = args.size or ("small" if device.type == "cuda" else "toy")
    settings = SIZES[size]
    changes = {key: value for key, value in (("steps", args.steps), ("batch_size", args.batch_size),
                                             ("lr", args.lr), ("train_len", args.train_len),
                                             ("eval_samples", args.eval_samples), ("log_every", args.log_every))
               if value is not None}
    if "steps" in changes:
        changes["warmup_steps"] = min(settings.warmup_steps, max(1, changes["steps"] // 10))
    settings = replace(settings, **changes)
    if settings.steps < 1 or settings.batch_size < 1 or settings.eval_samples < 1:
        log("error: --steps, --batch-size and --eval-samples must be positive")
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in PATTERNS]
    if unknown or not models:
        log(f"error: unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}")
        return 2
    backend = args.backend or ("reference" if device.type == "cpu" else None)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    try:
        settings.task.max_entries(settings.train_len * max(settings.eval_factors))
        settings.train_entries()
    except ValueError as error:
        log(f"error: {error}")
        return 2
    log(f"phonebook demo, size {size}")
    threads = torch.get_num_threads()
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(max(1, args.threads or 1))
    try:
        results = run_demo(settings, models, args.seed, device, backend, precision, log)
    finally:
        torch.set_num_threads(threads)
    results["size"] = size
    log("")
    log(format_table(results))
    if args.plot:
        problem = save_plot(results, args.plot)
        log(f"plot: {problem}" if problem else f"plot written to {args.plot}")
    if args.json == "-":
        print(json.dumps(results, indent=2))
    elif args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
