"""MHA vs GQA vs MQA vs MLA vs MQA+CLA2 at matched parameter count: validation loss against KV bytes per token.

The same tiny byte-level decoder (``dldna.attention.grouped.TinyDecoder``) is trained on the same AG News text
(titles + descriptions as UTF-8 bytes; local train file, validation on the test split) with the same seed, data
order, optimizer and step budget; only the attention differs. Variants with fewer K/V weights get a wider SwiGLU
so every model has the MHA model's parameter count (``matched_intermediate_size``). The question is the one of
the CLA paper (Brandon et al. 2024, arXiv:2405.12981): how much validation loss does each halving of the KV
cache cost? At this toy scale differences are small, so the run repeats every variant over several seeds and
reports the spread.

``python -m dldna.experiments.kv_variants`` runs the full-size version on the CPU (measured on a 2-core machine: 80 s
per variant and seed with ``--threads 1``, about 8 minutes per seed for the six variants; two threads were 7 times
slower there, the matrices being too small to share) and writes
``results/kv_variants.json`` (``--seeds 2 3`` writes ``results/kv_variants_seeds2_3.json``; ``combine_records``
pools them). Chapter 6 plots the stored runs and reruns a tiny version in fast mode.
Used in chapter 6.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from dldna.attention.grouped import KVDecoderConfig, TinyDecoder, matched_intermediate_size
from dldna.training import cosine_with_warmup, cross_entropy, evaluate, make_adamw, train

#: Attention of each compared variant (overrides of ``ExperimentConfig.base``).
VARIANTS = {
    "MHA": dict(n_kv_heads=4),
    "GQA-2": dict(n_kv_heads=2),
    "MQA": dict(n_kv_heads=1),
    "MLA": dict(attention="mla"),  # sizes from the head_dim: see ``variant_config``
    "MQA+CLA2": dict(n_kv_heads=1, cla_share=2),
    "GQA-2+CLA2": dict(n_kv_heads=2, cla_share=2),
}


@dataclass
class ExperimentConfig:
    """Sizes and budget; ``tiny()`` is the fast-mode version (seconds on a CPU)."""

    hidden_size: int = 64
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 16
    mha_intermediate_size: int = 176
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    val_batches: int = 32
    train_rows: int | None = None
    val_rows: int = 2000
    seeds: tuple[int, ...] = (0, 1)

    @classmethod
    def tiny(cls) -> "ExperimentConfig":
        return cls(hidden_size=32, n_layers=2, n_heads=4, head_dim=8, mha_intermediate_size=64, seq_len=32,
                   batch_size=4, steps=4, warmup=1, val_batches=2, train_rows=200, val_rows=50, seeds=(0,))

    def base(self) -> KVDecoderConfig:
        return KVDecoderConfig(vocab_size=256, hidden_size=self.hidden_size, n_layers=self.n_layers,
                               n_heads=self.n_heads, n_kv_heads=self.n_heads, head_dim=self.head_dim,
                               intermediate_size=self.mha_intermediate_size)


def byte_stream(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes of the texts joined by newlines, as a uint8 tensor (vocabulary 256, no tokenizer)."""
    return torch.frombuffer(bytearray("\n".join(texts).encode("utf-8")), dtype=torch.uint8).clone()


class WindowBatches:
    """Random windows of ``seq_len + 1`` bytes as ``(inputs, targets)``; the same order on every ``iter``."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, n_batches: int | None = None):
        if stream.numel() <= seq_len + 1:
            raise ValueError(f"stream of {stream.numel()} bytes is too short for seq_len={seq_len}")
        self.stream, self.batch_size, self.seq_len, self.seed, self.n_batches = stream, batch_size, seq_len, seed, n_batches

    def __len__(self):
        if self.n_batches is None:
            raise TypeError("an endless WindowBatches has no length")
        return self.n_batches

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        offsets = torch.arange(self.seq_len + 1)
        i = 0
        while self.n_batches is None or i < self.n_batches:
            starts = torch.randint(0, self.stream.numel() - self.seq_len - 1, (self.batch_size, 1), generator=gen)
            window = self.stream[starts + offsets].long()
            yield window[:, :-1], window[:, 1:]
            i += 1


def variant_config(name: str, exp: ExperimentConfig) -> KVDecoderConfig:
    """The variant's decoder config with its SwiGLU widened to match the MHA model's parameter count."""
    if name not in VARIANTS:
        raise ValueError(f"name must be one of {list(VARIANTS)}, got {name!r}")
    base = exp.base()
    target = TinyDecoder(base).num_parameters()
    config = replace(base, **VARIANTS[name], name=name)
    if config.attention == "mla":  # DeepSeek-V2's proportions: d_c = 4 d_h, d_h^R = d_h / 2 (cache 4.5 d_h per layer)
        hd = exp.head_dim
        config = replace(config, kv_lora_rank=4 * hd, qk_rope_head_dim=2 * max(1, hd // 4), qk_nope_head_dim=hd,
                         v_head_dim=hd)
    return replace(config, intermediate_size=matched_intermediate_size(config, target))


def load_streams(exp: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train bytes (AG News train split) and validation bytes (test split); local files only, no download."""
    from dldna.data.agnews import load_ag_news

    train_split = load_ag_news("train", allow_download=False, limit=exp.train_rows)
    val_split = load_ag_news("test", allow_download=False, limit=exp.val_rows)
    source = f"AG News train: {train_split.source}; validation: test split, {val_split.source}"
    return byte_stream(train_split.texts), byte_stream(val_split.texts), source


def run_variant(name: str, exp: ExperimentConfig, train_bytes: torch.Tensor, val_bytes: torch.Tensor, seed: int,
                progress: bool = False) -> dict:
    """Train one variant with one seed; returns its parameters, KV bytes/token, losses and time."""
    config = variant_config(name, exp)
    torch.manual_seed(seed)
    model = TinyDecoder(config)
    opt = make_adamw(model, lr=exp.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = cosine_with_warmup(opt, exp.warmup, exp.steps, min_lr_ratio=0.1)
    val = WindowBatches(val_bytes, exp.batch_size, exp.seq_len, seed=1234, n_batches=exp.val_batches)
    t0 = time.perf_counter()
    hist = train(model, WindowBatches(train_bytes, exp.batch_size, exp.seq_len, seed=seed), opt, scheduler=sched,
                 max_steps=exp.steps, loss_fn=cross_entropy, grad_clip=1.0, progress=progress, desc=name,
                 eval_fn=lambda m: evaluate(m, val, loss_fn=cross_entropy), eval_every=max(1, exp.steps // 4))
    seconds = time.perf_counter() - t0
    val_loss = hist["eval_loss"][-1]
    return dict(variant=name, seed=seed, params=model.num_parameters(), intermediate_size=config.intermediate_size,
                kv_bytes_per_token_bf16=config.kv_bytes_per_token(2),
                kv_numbers_per_token_per_layer=config.kv_bytes_per_token(1) / config.n_layers,
                val_loss=val_loss, val_bits_per_byte=val_loss / math.log(2), final_train_loss=hist["loss"][-1],
                eval_steps=hist["eval_step"], eval_losses=hist["eval_loss"], train_seconds=seconds)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per variant: mean and spread (min, max) of the validation loss over seeds."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        losses = [r["val_loss"] for r in mine]
        rows.append(dict(variant=name, params=mine[0]["params"], kv_bytes_per_token_bf16=mine[0]["kv_bytes_per_token_bf16"],
                         val_loss_mean=sum(losses) / len(losses), val_loss_min=min(losses), val_loss_max=max(losses),
                         seeds=len(losses)))
    return rows


def run_experiment(exp: ExperimentConfig | None = None, variants: list[str] | None = None,
                   progress: bool = True) -> dict:
    """Every variant x seed; returns ``{"config", "data_source", "runs", "summary"}``."""
    exp = exp or ExperimentConfig()
    names = list(VARIANTS) if variants is None else variants
    train_bytes, val_bytes, source = load_streams(exp)
    runs = []
    from tqdm.auto import tqdm

    jobs = [(n, s) for s in exp.seeds for n in names]
    for name, seed in tqdm(jobs, desc="variants x seeds", disable=not progress):
        runs.append(run_variant(name, exp, train_bytes, val_bytes, seed))
    return dict(config=asdict(exp), data_source=source, runs=runs, summary=summarize(runs))


def combine_records(*records: dict) -> dict:
    """Pool the runs of several stored results (e.g. seeds run separately; each run depends only on its seed).

    Returns ``{"runs", "summary", "data_source", "provenance"}``; raises ``ValueError`` if the configs differ.
    """
    from dldna.results import provenance

    if not records:
        raise ValueError("records must hold at least one stored result")
    configs = [{k: v for k, v in r["data"]["config"].items() if k != "seeds"} for r in records]
    if any(c != configs[0] for c in configs):
        raise ValueError("records must come from the same experiment config (seeds aside)")
    runs = [run for r in records for run in r["data"]["runs"]]
    return dict(runs=runs, summary=summarize(runs), data_source=records[0]["data"]["data_source"],
                provenance=[provenance(r) for r in records])


def plot_loss_vs_kv(result: dict):
    """Scatter of validation loss against KV bytes per token (one point per seed, the mean marked); returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, row in enumerate(result["summary"]):
        runs = [r for r in result["runs"] if r["variant"] == row["variant"]]
        x = row["kv_bytes_per_token_bf16"] / 1024
        ax.scatter([x] * len(runs), [r["val_loss"] for r in runs], color=f"C{i}", alpha=0.4, s=18)
        ax.scatter([x], [row["val_loss_mean"]], color=f"C{i}", s=70, marker="D", label=row["variant"])
    ax.set_xscale("log", base=2)
    ax.set(xlabel="KV cache per token, all layers (KiB, bf16)", ylabel="validation loss (nats / byte)",
           title="Same parameters, same data: loss vs KV cache")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the fast-mode sizes (a smoke test)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default: results/)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = ExperimentConfig.tiny() if args.tiny else ExperimentConfig()
    if args.steps:
        exp = replace(exp, steps=args.steps, warmup=max(1, args.steps // 10))
    if args.seeds:
        exp = replace(exp, seeds=tuple(args.seeds))
    t0 = time.perf_counter()
    result = run_experiment(exp)
    result["wall_seconds"] = time.perf_counter() - t0
    result["torch_threads"] = torch.get_num_threads()
    for row in result["summary"]:
        print(f"{row['variant']:<12} params {row['params']:>8,}  KV {row['kv_bytes_per_token_bf16']:>6} B/token  "
              f"val loss {row['val_loss_mean']:.4f} [{row['val_loss_min']:.4f}, {row['val_loss_max']:.4f}]")
    from dldna.results import command_line, save_result

    name = "kv_variants_tiny" if args.tiny else "kv_variants"
    if args.seeds and not args.tiny and tuple(args.seeds) != ExperimentConfig().seeds:
        name += "_seeds" + "_".join(str(s) for s in args.seeds)
    command = command_line("python -m dldna.experiments.kv_variants", argv)
    print("saved", save_result(name, result, command, args.out_dir))


if __name__ == "__main__":
    main()
