"""Chapter 12's controlled experiment: dense vs Mixture-of-Experts language models on the toy languages.

Four decoders share everything (embedding, 2 attention layers, width 64, the data stream, the seed) except the
feed-forward:

* ``dense``        SwiGLU of width 128                          (FFN active = total = 1x)
* ``moe``          8 experts of width 64, top-2, balancing loss  (FFN active 1x, total 4x)
* ``moe_no_aux``   the same without the balancing loss
* ``dense_4x``     SwiGLU of width 512                          (FFN active = total = 4x: equal *total* parameters)

Recorded: validation loss over training, expert loads (fraction of assignments per expert) over training, the
routing by language at the end, and for the trained MoE models the fraction of dropped assignments and the
validation loss under capacity factors. ``python -m dldna.experiments.moe_lm`` writes
``results/moe_toy_languages.json`` (CPU-sized: a few minutes). Used in chapter 12.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dldna.config import seed_everything
from dldna.data.toy_languages import ToyLanguages, toy_language_batches
from dldna.models.mistral import MistralConfig, MistralForCausalLM
from dldna.models.moe import MoEConfig, MoEForCausalLM
from dldna.training import cosine_with_warmup, make_adamw, train

KINDS = ("dense", "moe", "moe_no_aux", "dense_4x")


def make_model(kind: str, vocab_size: int, hidden: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2,
               expert_width: int = 64, aux_coef: float = 0.01, seed: int = 0) -> torch.nn.Module:
    """One of ``KINDS``; dense width ``top_k * expert_width`` (equal active FFN) or ``experts * expert_width``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, sliding_window=None, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None, rope_theta=10000.0)
    seed_everything(seed)
    if kind.startswith("dense"):
        width = top_k * expert_width if kind == "dense" else experts * expert_width
        return MistralForCausalLM(MistralConfig(intermediate_size=width, **common))
    cfg = MoEConfig(intermediate_size=expert_width, num_local_experts=experts, num_experts_per_tok=top_k,
                    output_router_logits=True, router_aux_loss_coef=aux_coef if kind == "moe" else 0.0, **common)
    return MoEForCausalLM(cfg)


def ffn_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and per-token (active) parameters of the model and of its feed-forward layers."""
    total = sum(p.numel() for p in model.parameters())
    ffn = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    active = model.num_active_parameters() if isinstance(model, MoEForCausalLM) else total
    return {"total": total, "active": active, "ffn_total": ffn, "ffn_active": ffn - (total - active)}


@torch.no_grad()
def routing_stats(model: MoEForCausalLM, ids: torch.Tensor, language: torch.Tensor, num_languages: int) -> dict:
    """Per layer: expert load ``(E,)`` (share of assignments) and routing by language ``(L, E)`` (rows sum to 1)."""
    model.eval()
    model(ids, output_router_logits=False)
    out = {"load": [], "by_language": []}
    token_lang = language[:, None].expand_as(ids).reshape(-1)
    for block in model.model.moe_blocks():
        r = block.routing
        e = block.num_experts
        out["load"].append((r.expert_counts.float() / r.expert_counts.sum()).tolist())
        onehot = torch.nn.functional.one_hot(r.selected_experts, e).sum(1).float()  # (T, E)
        rows = [onehot[token_lang == lang].mean(0) / block.top_k for lang in range(num_languages)]
        out["by_language"].append(torch.stack(rows).tolist())
    return out


@torch.no_grad()
def lm_loss(model: torch.nn.Module, ids: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of ``ids`` without auxiliary losses."""
    model.eval()
    losses = [model(ids[i:i + batch], labels=ids[i:i + batch], output_router_logits=False).loss.item()
              for i in range(0, len(ids), batch)]  # Mistral ignores the router flag
    return sum(losses) / len(losses)


@torch.no_grad()
def capacity_sweep(model: MoEForCausalLM, ids: torch.Tensor, factors=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> dict:
    """Dropped fraction of assignments (mean over layers) and validation loss for each capacity factor.

    The capacity is per forward call, so tokens compete within a batch of 64 sequences.
    """
    blocks = model.model.moe_blocks()
    out = {"factor": [], "dropped": [], "loss": []}
    for factor in list(factors) + [None]:
        for b in blocks:
            b.capacity_factor = factor
        loss = lm_loss(model, ids)
        model(ids[:64], output_router_logits=False)
        dropped = sum(b.routing.dropped_fraction for b in blocks) / len(blocks)
        out["factor"].append(factor)
        out["dropped"].append(dropped)
        out["loss"].append(loss)
    for b in blocks:
        b.capacity_factor = None
    return out


def run_one(kind: str, langs: ToyLanguages, steps: int, batch_size: int, seq_len: int, val_ids: torch.Tensor,
            val_lang: torch.Tensor, eval_every: int, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train one model; return its history, parameter counts and (MoE) routing statistics over training."""
    model = make_model(kind, langs.vocab_size, seed=seed)
    opt = make_adamw(model, lr=lr, weight_decay=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=max(1, steps // 20), total_steps=steps, min_lr_ratio=0.1)
    loads: list = []

    def eval_fn(m):
        if isinstance(m, MoEForCausalLM):
            loads.append(routing_stats(m, val_ids[:64], val_lang[:64], langs.num_languages)["load"])
        return {"val_loss": lm_loss(m, val_ids)}

    hist = train(model, toy_language_batches(langs, batch_size, seq_len, seed=seed + 1), opt, scheduler=sched,
                 max_steps=steps, grad_clip=1.0, eval_fn=eval_fn, eval_every=eval_every, progress=progress, desc=kind)
    out = {"kind": kind, "params": ffn_parameters(model), "step": hist["step"], "train_loss": hist["loss"],
           "eval_step": hist["eval_step"], "val_loss": hist["eval_val_loss"], "time_s": hist["time_s"]}
    if isinstance(model, MoEForCausalLM):
        out["load_history"] = loads  # [eval][layer][expert]
        out["routing"] = routing_stats(model, val_ids, val_lang, langs.num_languages)
        out["capacity"] = capacity_sweep(model, val_ids)
    return out


def run_experiment(steps: int = 600, batch_size: int = 32, seq_len: int = 128, eval_every: int = 50,
                   kinds=KINDS, num_val: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """All ``kinds`` on the same data; returns a JSON-ready dict (see the module docstring)."""
    langs = ToyLanguages(num_languages=4, words_per_language=64, seed=seed)
    val_ids, val_lang = langs.sample(num_val, seq_len, torch.Generator().manual_seed(10_000 + seed))
    runs = {kind: run_one(kind, langs, steps, batch_size, seq_len, val_ids, val_lang, eval_every, seed=seed,
                          progress=progress) for kind in kinds}
    return {"config": {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "eval_every": eval_every,
                       "num_languages": langs.num_languages, "words_per_language": langs.words_per_language,
                       "word_entropy_bits": langs.word_entropy_bits(), "seed": seed},
            "runs": runs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--name", default="moe_toy_languages")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run_experiment(args.steps, args.batch_size, args.seq_len, args.eval_every, kinds=args.kinds.split(","),
                          seed=args.seed)
    from dldna.results import save_result

    command = "python -m dldna.experiments.moe_lm " + " ".join(argv if argv is not None else sys.argv[1:])
    path = save_result(args.name, data, command.strip())
    for kind, run in data["runs"].items():
        print(f"{kind:>11}: final val loss {run['val_loss'][-1]:.4f}  params {run['params']}  {run['time_s']:.0f}s")
    print("wrote", path)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------- plots (chapter 12)
LABELS = {"dense": "dense, FFN 128 (1x)", "moe": "MoE 8x64 top-2 + balancing loss", "moe_no_aux": "MoE, no balancing loss",
          "dense_4x": "dense, FFN 512 (4x total)"}


def plot_val_loss(runs: dict, title: str = "validation loss"):
    """Validation loss against training step, one line per model kind; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for kind, run in runs.items():
        ax.plot(run["eval_step"], run["val_loss"], marker="o", ms=3, label=LABELS.get(kind, kind))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/char, log scale)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_expert_loads(runs: dict, layer: int = 0):
    """Heatmaps (eval step x expert) of the share of assignments per expert, one panel per MoE run."""
    import matplotlib.pyplot as plt

    moe = {k: r for k, r in runs.items() if "load_history" in r}
    fig, axes = plt.subplots(1, len(moe), figsize=(4.2 * len(moe), 3.4), squeeze=False)
    for ax, (kind, run) in zip(axes[0], moe.items()):
        loads = torch.tensor([step[layer] for step in run["load_history"]])  # (evals, E)
        im = ax.imshow(loads.T, aspect="auto", cmap="magma", vmin=0, vmax=max(0.5, float(loads.max())),
                       extent=(run["eval_step"][0] - 0.5, run["eval_step"][-1] + 0.5, loads.shape[1] - 0.5, -0.5))
        ax.set_title(f"{LABELS.get(kind, kind)}\nlayer {layer}: max share {loads[-1].max():.2f} "
                     f"(uniform {1 / loads.shape[1]:.3f})", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="share of assignments")
    fig.tight_layout()
    return fig


def plot_routing_by_language(run: dict, layer: int = 0):
    """Heatmap (language x expert): the share of a language's assignments that go to each expert."""
    import matplotlib.pyplot as plt

    table = torch.tensor(run["routing"]["by_language"][layer])
    fig, ax = plt.subplots(figsize=(5.2, 2.6))
    im = ax.imshow(table, cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("language")
    ax.set_yticks(range(table.shape[0]))
    ax.set_title(f"{LABELS.get(run['kind'], run['kind'])}: routing by language, layer {layer}", fontsize=9)
    fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    return fig


def plot_capacity(runs: dict):
    """Dropped assignments and validation loss against the capacity factor, for the trained MoE runs."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for kind, run in runs.items():
        if "capacity" not in run:
            continue
        cap = run["capacity"]
        xs = [f for f in cap["factor"] if f is not None]
        a1.plot(xs, [100 * d for d, f in zip(cap["dropped"], cap["factor"]) if f is not None], marker="o",
                label=LABELS.get(kind, kind))
        line = a2.plot(xs, [v for v, f in zip(cap["loss"], cap["factor"]) if f is not None], marker="o",
                       label=LABELS.get(kind, kind))
        a2.axhline(cap["loss"][cap["factor"].index(None)], color=line[0].get_color(), ls=":", lw=1)
    a1.set_xlabel("capacity factor")
    a1.set_ylabel("dropped assignments (%)")
    a2.set_xlabel("capacity factor")
    a2.set_ylabel("validation loss (dotted: no cap)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
