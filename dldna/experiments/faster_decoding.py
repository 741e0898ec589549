"""Chapter 13's experiments: speculative decoding and multi-token prediction on the toy languages.

Trains (on the same data stream) a target decoder, a small draft decoder (checkpointed at several step counts, so
the chapter can plot acceptance against draft quality) and a multi-token-prediction model, then measures:

* acceptance rate and tokens per target call against ``k`` (greedy and temperature 1), with the prediction
  ``alpha = E[sum_x min(p, q)]`` computed from the two models' distributions on validation text;
* acceptance against draft quality (the draft's validation loss);
* wall-clock tokens/s of plain vs speculative greedy decoding, and the cost of one target forward against the
  number of tokens it scores (why verification is nearly free when decoding is memory-bound);
* MTP: per-head validation loss and accuracy, tokens per forward of self-speculative decoding against the number
  of heads used, and its tokens/s.

``python -m dldna.experiments.faster_decoding`` writes ``results/faster_decoding_cpu.json`` (a few minutes on a
CPU). ``benchmarks/speculative.py`` runs the timing part at GPU size. Used in chapter 13.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from dldna.config import seed_everything
from dldna.data.toy_languages import ToyLanguages, toy_language_batches
from dldna.models.generation import generate
from dldna.models.mistral import MistralConfig, MistralForCausalLM
from dldna.models.mtp import MultiTokenPredictionLM, mtp_generate
from dldna.models.speculative import expected_acceptance_rate, speculative_generate
from dldna.training import cosine_with_warmup, make_adamw, train


def decoder_config(vocab_size: int, hidden: int, layers: int, heads: int = 4) -> MistralConfig:
    """A small full-attention Mistral config for the toy languages (intermediate = 2 * hidden)."""
    return MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, sliding_window=None, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)


def train_lm(model: torch.nn.Module, langs: ToyLanguages, steps: int, batch_size: int = 32, seq_len: int = 96,
             lr: float = 3e-3, seed: int = 0, checkpoints=(), device="cpu", progress: bool = True,
             desc: str = "train") -> tuple[dict, dict]:
    """Train on fresh toy-language batches; returns ``(history, {step: state_dict copy})`` at ``checkpoints``."""
    opt = make_adamw(model, lr=lr, weight_decay=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=max(1, steps // 20), total_steps=steps, min_lr_ratio=0.1)
    saved: dict = {}
    done = 0
    hist = {"step": [], "loss": []}
    for stop in sorted(set(list(checkpoints) + [steps])):
        h = train(model, toy_language_batches(langs, batch_size, seq_len, seed=seed + 1 + done), opt,
                  scheduler=sched, max_steps=stop - done, grad_clip=1.0, device=device, progress=progress, desc=desc)
        hist["step"] += [done + s for s in h["step"]]
        hist["loss"] += h["loss"]
        done = stop
        saved[stop] = copy.deepcopy(model.state_dict())
    model.eval()
    return hist, saved


@torch.no_grad()
def val_loss(model, ids: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    out = [model(ids[i:i + batch], labels=ids[i:i + batch]).loss.item() for i in range(0, len(ids), batch)]
    return sum(out) / len(out)


@torch.no_grad()
def predicted_acceptance(target, draft, ids: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean over validation positions of ``sum_x min(p, q)`` (greedy: P[argmax p == argmax q])."""
    p_logits, q_logits = target(ids).logits.float(), draft(ids).logits.float()
    if temperature == 0:
        return (p_logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    p, q = (p_logits / temperature).softmax(-1), (q_logits / temperature).softmax(-1)
    return expected_acceptance_rate(p, q).mean().item()


def speculative_stats(target, draft, prompts: torch.Tensor, new_tokens: int, k: int, temperature: float,
                      seed: int = 0) -> dict:
    """Acceptance of ``speculative_generate`` over several prompts: ``acceptance`` = accepted / drafted guesses,
    ``alpha`` = accepted / tested guesses (estimate of the per-guess acceptance probability), tokens per call."""
    g = torch.Generator(device=prompts.device).manual_seed(seed)
    acc = drafted = tested = calls = emitted = 0
    for row in prompts:
        out = speculative_generate(target, draft, row[None], new_tokens, k=k, temperature=temperature, generator=g)
        acc, drafted, tested = acc + out.num_accepted, drafted + out.num_drafted, tested + out.num_tested
        calls, emitted = calls + out.target_calls, emitted + out.sequences.shape[1] - prompts.shape[1]
    return {"k": k, "temperature": temperature, "acceptance": acc / max(1, drafted), "alpha": acc / max(1, tested),
            "tokens_per_target_call": emitted / calls}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def tokens_per_second(fn, prompts: torch.Tensor, new_tokens: int, repeats: int = 1) -> float:
    """Generated tokens per second of ``fn(prompt_row (1, N)) -> anything`` over all prompts (best of repeats)."""
    best = float("inf")
    fn(prompts[:1])  # warm-up
    for _ in range(repeats):
        _sync(prompts.device)
        t0 = time.perf_counter()
        for row in prompts:
            fn(row[None])
        _sync(prompts.device)
        best = min(best, time.perf_counter() - t0)
    return len(prompts) * new_tokens / best


@torch.no_grad()
def forward_cost(model, context: int, new_tokens=(1, 2, 4, 8, 16), repeats: int = 11, device="cpu") -> dict:
    """Median seconds of one cached forward scoring ``n`` new tokens after ``context`` cached ones."""
    from dldna.models.cache import KVCache

    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (1, context + max(new_tokens)), device=device)
    out = {"new_tokens": list(new_tokens), "seconds": []}
    for n in new_tokens:
        times = []
        for _ in range(repeats + 1):
            cache = KVCache(model.config.num_hidden_layers)
            model(ids[:, :context], past_key_values=cache, use_cache=True)
            _sync(device)
            t0 = time.perf_counter()
            model(ids[:, context:context + n], past_key_values=cache, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out["seconds"].append(sorted(times[1:])[len(times[1:]) // 2])
    return out


@torch.no_grad()
def mtp_head_metrics(model: MultiTokenPredictionLM, ids: torch.Tensor) -> dict:
    """Per head ``i``: validation loss and top-1 accuracy at predicting token ``t + i``."""
    out = model(ids, labels=ids)
    acc = []
    for i in range(model.n_future):
        pred = out.head_logits[i, :, :ids.shape[1] - 1 - i].argmax(-1)
        acc.append((pred == ids[:, 1 + i:]).float().mean().item())
    return {"loss": out.head_losses.tolist(), "accuracy": acc}


def run_experiment(target_steps: int = 600, draft_checkpoints=(25, 75, 200, 600), mtp_steps: int = 600,
                   batch_size: int = 32, seq_len: int = 96, ks=(1, 2, 3, 4, 6, 8), num_prompts: int = 8,
                   prompt_len: int = 16, new_tokens: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Everything in the module docstring; returns a JSON-ready dict."""
    langs = ToyLanguages(num_languages=4, words_per_language=64, seed=seed)
    val_ids, _ = langs.sample(128, seq_len, torch.Generator().manual_seed(10_000 + seed))
    prompts, _ = langs.sample(num_prompts, prompt_len, torch.Generator().manual_seed(20_000 + seed))
    v = langs.vocab_size
    seed_everything(seed)
    target = MistralForCausalLM(decoder_config(v, 128, 4))
    t_hist, _ = train_lm(target, langs, target_steps, batch_size, seq_len, seed=seed, progress=progress,
                         desc="target")
    seed_everything(seed + 1)
    draft = MistralForCausalLM(decoder_config(v, 32, 1, heads=2))
    d_hist, d_states = train_lm(draft, langs, max(draft_checkpoints), batch_size, seq_len, seed=seed,
                                checkpoints=draft_checkpoints, progress=progress, desc="draft")
    result = {"config": {"target_steps": target_steps, "draft_checkpoints": list(draft_checkpoints),
                         "mtp_steps": mtp_steps, "batch_size": batch_size, "seq_len": seq_len,
                         "num_prompts": num_prompts, "prompt_len": prompt_len, "new_tokens": new_tokens,
                         "target_params": sum(p.numel() for p in target.parameters()),
                         "draft_params": sum(p.numel() for p in draft.parameters()), "seed": seed},
              "target_val_loss": val_loss(target, val_ids), "target_history": t_hist, "draft_history": d_hist}

    # acceptance against draft quality (k = 4)
    quality = []
    for step, state in sorted(d_states.items()):
        draft.load_state_dict(state)
        row = {"draft_step": step, "draft_val_loss": val_loss(draft, val_ids)}
        for temp in (1.0, 0.0):
            tag = "greedy" if temp == 0 else "t1"
            row[f"predicted_{tag}"] = predicted_acceptance(target, draft, val_ids, temp)
            stats = speculative_stats(target, draft, prompts, new_tokens, 4, temp)
            row[f"measured_{tag}"], row[f"accepted_fraction_{tag}"] = stats["alpha"], stats["acceptance"]
        quality.append(row)
    result["draft_quality"] = quality

    # acceptance against k, final draft
    result["by_k"] = [speculative_stats(target, draft, prompts, new_tokens, k, temp)
                      for temp in (1.0, 0.0) for k in ks]

    # wall clock (greedy; CPU here) and the cost of scoring n tokens in one forward
    plain = tokens_per_second(lambda p: generate(target, p, new_tokens, temperature=0), prompts, new_tokens)
    timing = {"plain_tokens_per_s": plain, "speculative_tokens_per_s": {}}
    for k in (2, 4, 6):
        timing["speculative_tokens_per_s"][str(k)] = tokens_per_second(
            lambda p: speculative_generate(target, draft, p, new_tokens, k=k, temperature=0), prompts, new_tokens)
    timing["target_forward"] = forward_cost(target, 64)
    timing["draft_forward"] = forward_cost(draft, 64, new_tokens=(1,))
    result["timing"] = timing

    # multi-token prediction: same trunk size as the target, 4 heads
    seed_everything(seed + 2)
    mtp = MultiTokenPredictionLM(decoder_config(v, 128, 4), n_future=4)
    m_hist, _ = train_lm(mtp, langs, mtp_steps, batch_size, seq_len, seed=seed, progress=progress, desc="mtp")
    mtp_res = {"history": m_hist, "heads": mtp_head_metrics(mtp, val_ids), "by_heads": []}
    for heads in range(1, mtp.n_future + 1):
        calls = emitted = 0
        for row in prompts:
            out = mtp_generate(mtp, row[None], new_tokens, draft_heads=heads)
            calls, emitted = calls + out.target_calls, emitted + new_tokens
        mtp_res["by_heads"].append({"heads": heads, "tokens_per_forward": emitted / calls})
    mtp_res["plain_tokens_per_s"] = tokens_per_second(lambda p: generate(mtp, p, new_tokens, temperature=0),
                                                      prompts, new_tokens)
    mtp_res["self_speculative_tokens_per_s"] = tokens_per_second(lambda p: mtp_generate(mtp, p, new_tokens),
                                                                 prompts, new_tokens)
    same = all(torch.equal(mtp_generate(mtp, r[None], new_tokens).sequences,
                           generate(mtp, r[None], new_tokens, temperature=0)) for r in prompts)
    mtp_res["equals_greedy"] = same
    mtp_res["sample"] = langs.decode(mtp_generate(mtp, prompts[:1], new_tokens).sequences[0])
    result["mtp"] = mtp_res
    result["target_sample"] = langs.decode(generate(target, prompts[:1], new_tokens, temperature=0)[0])
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-steps", type=int, default=600)
    parser.add_argument("--mtp-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="faster_decoding_cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = tuple(s for s in (25, 75, 200) if s < args.target_steps) + (args.target_steps,)
    data = run_experiment(args.target_steps, checkpoints, args.mtp_steps)
    from dldna.results import save_result

    command = "python -m dldna.experiments.faster_decoding " + " ".join(argv if argv is not None else sys.argv[1:])
    path = save_result(args.name, data, command.strip())
    print({k: data[k] for k in ("target_val_loss", "timing")})
    print("wrote", path)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------- plots (chapter 13)
def plot_theory(alphas=(0.5, 0.7, 0.8, 0.9, 0.95), max_k: int = 10):
    """Expected tokens per target call ``(1 - a^(k+1)) / (1 - a)`` against ``k`` for several acceptance rates."""
    import matplotlib.pyplot as plt

    from dldna.models.speculative import expected_tokens_per_call

    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ks = list(range(0, max_k + 1))
    for a in alphas:
        ax.plot(ks, [expected_tokens_per_call(a, k) for k in ks], marker=".", label=f"alpha = {a}")
    ax.set_xlabel("draft tokens per round k")
    ax.set_ylabel("expected tokens per target call")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_draft_quality(rows: list[dict]):
    """Measured per-guess acceptance (k = 4) and the prediction from the models' logits against draft loss."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    x = [r["draft_val_loss"] for r in rows]
    for tag, name in (("t1", "temperature 1"), ("greedy", "greedy")):
        line = ax.plot(x, [r[f"measured_{tag}"] for r in rows], marker="o", label=f"measured, {name}")
        ax.plot(x, [r[f"predicted_{tag}"] for r in rows], ls="--", color=line[0].get_color(),
                label=f"predicted from logits, {name}")
    for r in rows:
        ax.annotate(f"{r['draft_step']} steps", (r["draft_val_loss"], r["measured_t1"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("draft validation loss (nats/char)")
    ax.set_ylabel("acceptance rate")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_by_k(rows: list[dict]):
    """Acceptance and tokens per target call against k (one line per temperature), with the i.i.d. theory at the
    mean measured per-guess acceptance."""
    import matplotlib.pyplot as plt

    from dldna.models.speculative import expected_tokens_per_call

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for temp in sorted({r["temperature"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["temperature"] == temp]
        ks = [r["k"] for r in sel]
        name = "greedy" if temp == 0 else f"temperature {temp:g}"
        line = a1.plot(ks, [r["alpha"] for r in sel], marker="o", label=f"per tested guess, {name}")
        a1.plot(ks, [r["acceptance"] for r in sel], marker="x", ls=":", color=line[0].get_color(),
                label=f"accepted / drafted, {name}")
        line = a2.plot(ks, [r["tokens_per_target_call"] for r in sel], marker="o", label=f"measured, {name}")
        alpha = sum(r["alpha"] for r in sel) / len(sel)
        a2.plot(ks, [expected_tokens_per_call(alpha, k) for k in ks], ls="--", color=line[0].get_color(),
                label=f"theory, alpha = {alpha:.2f}")
    a1.set_ylabel("acceptance rate")
    a2.set_ylabel("tokens per target call")
    for ax in (a1, a2):
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_forward_cost(costs: dict, title: str):
    """Seconds of one cached forward against the number of tokens it scores."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    n, s = costs["new_tokens"], costs["seconds"]
    ax.plot(n, [1e3 * t for t in s], marker="o", label="measured")
    ax.plot(n, [1e3 * s[0] * m for m in n], ls=":", color="grey", label="n x one-token cost")
    ax.set_xlabel("tokens scored in one forward")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
