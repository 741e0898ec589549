"""Speculative decoding (Leviathan, Kalman & Matias 2023; Chen et al. 2023): a cheap draft model proposes ``k``
tokens, the target model scores all of them in **one** forward pass, and a rejection rule keeps a prefix of the
draft so that the emitted tokens are distributed **exactly** as if the target had sampled them one by one.

The rule, for draft token ``x`` proposed with draft probability ``q(x)`` where the target gives ``p(x)``::

    accept x with probability min(1, p(x) / q(x))
    on the first rejection emit a token from the residual  r(x) = max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y))
    if all k are accepted, emit a bonus token from the target's next distribution p_{k+1}

so one target call yields between 1 and k + 1 tokens. Proof sketch: P(emit x) = q(x) min(1, p/q) +
(1 - sum_y min(p, q)) r(x) = min(p, q)(x) + max(0, p - q)(x) = p(x). With ``temperature=0`` both models are
argmax: a draft token is accepted iff it equals the target's argmax and a rejection emits the target's argmax,
so the output equals the target's greedy output token for token.

Both models keep a KV cache. Rejected draft tokens are rolled back with ``crop_cache`` (``KVCache`` has no trim
method; this module crops its tensors and bookkeeping). That needs the whole stream in the cache, so the caches
made here keep every slot (no rolling window); the models' masks still apply their sliding windows.
Used in chapter 13.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dldna.models.cache import KVCache
from dldna.models.generation import CausalLMOutput

__all__ = ["speculative_generate", "SpeculativeOutput", "speculative_accept", "crop_cache", "BigramLM",
           "expected_acceptance_rate", "expected_tokens_per_call", "expected_speedup"]


@dataclass
class SpeculativeOutput:
    """``sequences`` ``(1, N + new)``, and the acceptance statistics of the run.

    ``accepted_per_round[i]`` draft tokens were accepted in round ``i`` out of ``drafted_per_round[i]``; each round
    is one target forward and emits ``accepted + 1`` tokens (the last round may be cut by ``max_new_tokens``/eos).
    """

    sequences: torch.Tensor
    accepted_per_round: list[int] = field(default_factory=list)
    drafted_per_round: list[int] = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted_per_round)

    @property
    def num_drafted(self) -> int:
        return sum(self.drafted_per_round)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (NaN when nothing was drafted). Guesses after a rejection count as drafted."""
        return self.num_accepted / self.num_drafted if self.num_drafted else float("nan")

    @property
    def num_tested(self) -> int:
        """Guesses that met the acceptance test: those before the first rejection of a round, plus that one."""
        return sum(a + (a < d) for a, d in zip(self.accepted_per_round, self.drafted_per_round))

    @property
    def per_token_acceptance(self) -> float:
        """Accepted / tested guesses: the estimate of ``alpha``, the chance that one guess passes the test."""
        return self.num_accepted / self.num_tested if self.num_tested else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        """Mean tokens emitted per target forward (1 for plain decoding)."""
        return (sum(self.accepted_per_round) + len(self.accepted_per_round)) / max(1, self.target_calls)


def crop_cache(cache: KVCache, length: int) -> None:
    """Forget every slot of ``cache`` from stream index ``length`` on (roll back rejected draft tokens), in place.

    Only for caches that keep the whole stream (``sliding_window=None``): a rolling buffer has already dropped
    slots it would need again.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.sliding_window is not None:
        raise ValueError("crop_cache needs a cache without a rolling window (sliding_window=None)")
    if not 0 <= length <= cache.seen_tokens:
        raise ValueError(f"length must be in [0, {cache.seen_tokens}], got {length}")
    if length == cache.seen_tokens:
        return
    cache.keys = [None if t is None else t[..., :length, :] for t in cache.keys]
    cache.values = [None if t is None else t[..., :length, :] for t in cache.values]
    cache.key_index = cache.key_index[:length]
    cache.key_valid = cache.key_valid[:, :length]
    cache.real_tokens = cache.key_valid.long().sum(-1)
    cache.seen_tokens = length


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised; falls back to ``p`` if it vanishes (only possible through rounding)."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p


def speculative_accept(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """The rejection step: ``(number of accepted draft tokens n, the token emitted after them)``.

    ``target_probs`` ``(k + 1, V)``: the target's distributions at the k draft positions and the one after;
    ``draft_probs`` ``(k, V)``: the draft's distributions the ``draft_tokens`` ``(k,)`` were sampled from.
    Emitted tokens: ``draft_tokens[:n]`` then the returned token (from the residual, or the bonus ``p_{k+1}``).
    """
    k = draft_tokens.shape[0]
    if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k or target_probs.shape[1] != draft_probs.shape[1]:
        raise ValueError(f"need target_probs (k+1, V), draft_probs (k, V) and draft_tokens (k,); got "
                         f"{tuple(target_probs.shape)}, {tuple(draft_probs.shape)}, {tuple(draft_tokens.shape)}")
    idx = torch.arange(k, device=draft_tokens.device)
    p_x, q_x = target_probs[idx, draft_tokens], draft_probs[idx, draft_tokens]
    u = torch.rand(k, generator=generator, device=target_probs.device)
    accepted = u * q_x < p_x  # u < p/q without dividing; always true when p >= q
    n = int(accepted.long().cumprod(0).sum()) if k else 0
    dist = target_probs[k] if n == k else _residual(target_probs[n], draft_probs[n])
    return n, int(torch.multinomial(dist, 1, generator=generator))


def _full_cache(model: nn.Module) -> KVCache:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise TypeError(f"{type(model).__name__} needs a config.num_hidden_layers to build its KV cache")
    return KVCache(layers, sliding_window=None)


def _next_logits(model: nn.Module, tokens: list[int], cache: KVCache, device, last: int) -> torch.Tensor:
    """Feed the tokens the cache has not seen yet; return the float32 logits of the last ``last`` positions."""
    new = torch.tensor([tokens[cache.get_seq_length():]], dtype=torch.long, device=device)
    out = model(new, past_key_values=cache, use_cache=True)
    return out.logits[0, -last:].float()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / temperature).softmax(-1)


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         k: int = 4, temperature: float = 1.0, generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> SpeculativeOutput:
    """Speculative sampling of up to ``max_new_tokens`` tokens after ``input_ids`` ``(1, N)``; one row at a time.

    ``target`` and ``draft`` follow the model contract of ``dldna.models.generation`` (``model(ids,
    past_key_values=cache, use_cache=True).logits``) over the same vocabulary and have a
    ``config.num_hidden_layers``. ``k`` draft tokens per round; ``temperature=0`` is greedy (identical to
    ``target.generate(..., temperature=0)``), otherwise tokens follow ``softmax(target_logits / temperature)``
    exactly. ``generator`` seeds the draft samples, the acceptance tests and the residual samples.
    Generation stops after ``eos_token_id``. Returns ``SpeculativeOutput`` (sequences + acceptance stats).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a (1, seq) torch.long tensor")
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (1, seq >= 1) (rows accept different numbers of tokens, so "
                         f"batches are not supported), got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0
    device = input_ids.device
    tokens = input_ids[0].tolist()
    prompt_len = len(tokens)
    out = SpeculativeOutput(sequences=input_ids)
    modes = (target.training, draft.training)
    target.eval(), draft.eval()
    t_cache, d_cache = _full_cache(target), _full_cache(draft)
    draft_vocab = None
    try:
        while len(tokens) - prompt_len < max_new_tokens:
            k_round = min(k, max_new_tokens - (len(tokens) - prompt_len) - 1)
            drafts, q_rows = [], []
            for _ in range(k_round):
                logits = _next_logits(draft, tokens + drafts, d_cache, device, 1)[0]
                out.draft_calls += 1
                draft_vocab = logits.shape[-1]
                if greedy:
                    drafts.append(int(logits.argmax()))
                else:
                    q = _probs(logits, temperature)
                    q_rows.append(q)
                    drafts.append(int(torch.multinomial(q, 1, generator=generator)))
            logits = _next_logits(target, tokens + drafts, t_cache, device, k_round + 1)
            out.target_calls += 1
            if draft_vocab is not None and draft_vocab != logits.shape[-1]:
                raise ValueError(f"target and draft must share the vocabulary, got {logits.shape[-1]} and "
                                 f"{draft_vocab} logits")
            if greedy:
                best = logits.argmax(-1).tolist()
                n = 0
                while n < k_round and drafts[n] == best[n]:
                    n += 1
                nxt = best[n]
            else:
                draft_tensor = torch.tensor(drafts, dtype=torch.long, device=device)
                q_all = torch.stack(q_rows) if q_rows else logits.new_zeros(0, logits.shape[-1])
                n, nxt = speculative_accept(_probs(logits, temperature), q_all, draft_tensor, generator)
            new = drafts[:n] + [nxt]
            out.accepted_per_round.append(n)
            out.drafted_per_round.append(k_round)
            tokens += new
            crop_cache(t_cache, len(tokens) - 1)
            crop_cache(d_cache, min(d_cache.get_seq_length(), len(tokens) - 1))
            if eos_token_id is not None and eos_token_id in new:
                del tokens[len(tokens) - len(new) + new.index(eos_token_id) + 1:]
                break
    finally:
        target.train(modes[0]), draft.train(modes[1])
    out.sequences = torch.tensor([tokens[:prompt_len + max_new_tokens]], dtype=torch.long, device=device)
    return out


def expected_acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q)``: the probability that one draft token is accepted."""
    return torch.minimum(p, q).sum(-1)


def expected_tokens_per_call(alpha: float, k: int) -> float:
    """Mean tokens per target call with i.i.d. acceptance ``alpha``: ``(1 - alpha^(k+1)) / (1 - alpha)``."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al. Thm 3.8: wall-clock gain ``(1 - alpha^(k+1)) / ((1 - alpha)(k c + 1))``, ``c`` = draft/target
    cost of one forward, when a target call on k + 1 tokens costs the same as on one (memory-bound decoding)."""
    return expected_tokens_per_call(alpha, k) / (k * cost_ratio + 1)


@dataclass
class BigramConfig:
    vocab_size: int
    num_hidden_layers: int = 1


class BigramLM(nn.Module):
    """A Markov chain as a language model: ``logits[t] = table[input_ids[t]]`` (``table`` ``(V, V)``).

    Its next-token distribution is known exactly, so chapter 13 and the tests can compare speculative samples with
    the true distribution. It follows the model contract and writes one-hot "keys" into a one-layer ``KVCache``,
    so cache roll-back is exercised too.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        if table.dim() != 2 or table.shape[0] != table.shape[1]:
            raise ValueError(f"table must be a square (vocab, vocab) tensor, got {tuple(table.shape)}")
        self.register_buffer("table", table.float())
        self.config = BigramConfig(table.shape[0])

    def forward(self, input_ids: torch.Tensor, past_key_values: KVCache | None = None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutput:
        if past_key_values is not None:
            past_key_values.begin(torch.ones_like(input_ids, dtype=torch.bool))
            onehot = nn.functional.one_hot(input_ids, self.config.vocab_size).float()[:, None]
            past_key_values.update(onehot, onehot, 0)
        return CausalLMOutput(logits=self.table[input_ids], past_key_values=past_key_values)
