"""Next-token sampling: greedy, temperature, top-k, top-p, one torch.Generator per sequence.

The log-prob of a sampled token is taken under the temperature-scaled, unfiltered distribution
log_softmax(logits / T): the one the trainer recomputes from the same logits (top-k / top-p only choose which
tokens may be drawn). Greedy (temperature 0) picks the argmax and reports log_softmax(logits) (T = 1).
Filtering order: top-k on the scaled logits, then top-p on the renormalised survivors (the smallest prefix of
the descending order whose mass reaches top_p; the most likely token always stays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SamplingParams:
    """temperature: 0 = greedy. top_k: 0 = off. top_p: 1 = off. max_new_tokens: response budget. stop_ids: a
    sampled stop id ends the response (it is kept as its last token). seed: member g of a group draws from
    torch.Generator seeded with seed * 1_000_003 + g."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"sampling.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens}: must be >= 0")
        self.stop_ids = tuple(int(t) for t in self.stop_ids)

    @classmethod
    def from_config(cls, sampling) -> SamplingParams:
        """From keye_train.config.rollout.SamplingConfig."""
        return cls(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            stop_ids=tuple(sampling.stop_ids),
            seed=sampling.seed,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, member: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + member)


def filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """scaled [..., V] fp32 logits / T -> the probabilities that are sampled from (zeros outside the filter)."""
    logits = scaled
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """logits [B, V] (any float dtype; computed in fp32) -> tokens [B] int64, log-probs [B] fp32.

    Batched inverse-CDF draws: each sampled row takes one uniform from its own generator and the token whose
    cumulative-probability interval holds it; only the uniforms (and top-k / top-p filters) loop over rows."""
    logits = logits.float()
    temperatures = [p.temperature if not p.greedy else 1.0 for p in params]
    if len(set(temperatures)) == 1:
        scaled = logits / temperatures[0]
    else:
        scaled = logits / to_device(temperatures, torch.float32, logits.device)[:, None]
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
    drawn = [row for row, p in enumerate(params) if not p.greedy]
    every = len(drawn) == len(params)
    tokens = None if every else torch.argmax(logits, dim=-1)
    if drawn:
        rows = None if every else to_device(drawn, torch.long, logits.device)
        probs = torch.exp(scaled - lse) if every else torch.exp(scaled[rows] - lse[rows])
        for i, row in enumerate(drawn):
            p = params[row]
            if p.top_k or p.top_p < 1:
                probs[i] = filtered_probs(scaled[row], p.top_k, p.top_p)
        uniforms = torch.cat([torch.rand(1, generator=generators[row], device=logits.device) for row in drawn])
        if every:
            tokens = inverse_cdf(probs, uniforms)
        else:
            tokens[rows] = inverse_cdf(probs, uniforms)
    return tokens, (scaled.gather(1, tokens[:, None]) - lse)[:, 0]


def to_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list on `device` without waiting for the device: a pageable upload would synchronise the
    stream, and the rollout engine queues the next decode step before it reads this one's tokens."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


CDF_BLOCK = 1024


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (unnormalised, >= 0), uniforms [R] in [0, 1) -> [R] the token t with
    F(t - 1) <= u * F(V - 1) < F(t), F the cumulative sum in float64. Two levels (block sums, then one block's
    running sum) instead of a float64 cumsum over the whole vocabulary, which is slow on the CPU."""
    rows, vocab = probs.shape
    blocks = F.pad(probs, (0, (-vocab) % CDF_BLOCK)).view(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [R, blocks]
    target = uniforms.double() * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True)[:, 0].clamp_(max=blocks.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    inner = blocks[torch.arange(rows, device=probs.device), block].cumsum(-1, dtype=torch.float64)  # [R, block]
    offset = torch.searchsorted(inner, (target - before)[:, None], right=True)[:, 0].clamp_(max=CDF_BLOCK - 1)
    tokens = (block * CDF_BLOCK + offset).clamp_(max=vocab - 1)
    # the two float64 sums of a block may round apart by ~1e-16: never return a token of probability zero
    zero = probs.gather(1, tokens[:, None])[:, 0] == 0
    return torch.where(zero, probs.argmax(-1), tokens)
