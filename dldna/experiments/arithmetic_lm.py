"""Teach a ~125k-parameter Phi-3 to evaluate arithmetic expressions, and measure it honestly.

The printed chapter reported "80 % accuracy" on 10 samples drawn from its training data. Here:

* validation and test problems come from ``dldna.data.arithmetic_dataset`` (labels from ``safe_eval``) and no
  test expression string is ever trained on: the training stream leaves out their keys;
* accuracy is **exact match of the greedy answer** on 1,000 held-out test expressions;
* learnability choices (answer digit order, fresh data vs a fixed set, an operand curriculum) are compared at
  equal model size and step budget (:data:`COMPARISON`).

``python -m dldna.experiments.arithmetic_lm --part comparison`` runs the comparison and ``--part final`` the final
recipe (see :func:`main`); they write ``results/phi3_arithmetic_<part><tag>.json`` and the final model's weights
``results/phi3_arithmetic_model<tag>.pt``, which chapter 11 loads. The same functions run the chapter's CPU-sized demo in fast mode. Used in chapter 11.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from dldna.data.arithmetic import (
    ArithmeticDataset,
    ArithmeticTokenizer,
    Problem,
    arithmetic_dataset,
    expression_key,
    pad_batch,
    parse_target,
    sample_problem_tensors,
)
from dldna.models.phi3 import Phi3Config, Phi3ForCausalLM
from dldna.training import cosine_with_warmup, make_adamw, train

__all__ = [
    "RunConfig",
    "COMPARISON",
    "FINAL",
    "held_out_problems",
    "stream_batches",
    "fixed_batches",
    "greedy_answers",
    "evaluate_exact_match",
    "error_breakdown",
    "train_arithmetic",
    "attention_maps",
    "plot_attention_maps",
    "load_trained_model",
    "main",
]


@dataclass
class RunConfig:
    """One training run. ``data="stream"`` draws fresh expressions every step (minus held-out ones);
    ``data="fixed"`` cycles over ``n_train`` distinct expressions. ``curriculum > 0`` grows the largest operand
    linearly from ``curriculum_start`` to ``max_operand`` over that fraction of the steps (stream only)."""

    name: str = "reversed, fresh data"
    reverse_answer: bool = True
    data: str = "stream"
    n_train: int = 100_000
    curriculum: float = 0.0
    curriculum_start: int = 9
    steps: int = 2000
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    max_operand: int = 50
    p_two_operators: float = 0.8
    scratchpad: bool = False  # write the first operation's value before the answer (stream data only)
    seed: int = 0
    eval_every: int = 250
    n_eval: int = 500
    model: dict = field(default_factory=dict)  # Phi3Config.tiny overrides

    def __post_init__(self):
        if self.data not in ("stream", "fixed"):
            raise ValueError(f"data must be 'stream' or 'fixed', got {self.data!r}")
        if not 0.0 <= self.curriculum < 1.0:
            raise ValueError(f"curriculum must be in [0, 1), got {self.curriculum}")
        if self.curriculum and self.data != "stream":
            raise ValueError("curriculum needs data='stream'")
        if self.scratchpad and self.data != "stream":
            raise ValueError("scratchpad needs data='stream'")
        for name in ("steps", "batch_size", "eval_every", "n_eval", "n_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


#: The learnability comparison of chapter 11: same model (Phi3Config.tiny), same steps, one change at a time.
COMPARISON = (
    RunConfig(name="plain answer, 10k fixed examples (printed data size)", reverse_answer=False, data="fixed",
              n_train=10_000),
    RunConfig(name="plain answer, fresh data", reverse_answer=False),
    RunConfig(name="reversed answer, 100k fixed examples", data="fixed", n_train=100_000),
    RunConfig(name="reversed answer, fresh data", reverse_answer=True),
    RunConfig(name="reversed answer, fresh data, operand curriculum", curriculum=0.3),
)

#: The recipe of the final, longer run (fixed before any result was seen: reversed digits, fresh data).
FINAL = RunConfig(name="final: reversed answer, fresh data", batch_size=2048)


def held_out_problems(n_val: int = 1000, n_test: int = 1000, n_train: int = 0, seed: int = 1234,
                      max_operand: int = 50, p_two_operators: float = 0.8) -> dict[str, list[Problem]]:
    """Validation / test (and optionally a fixed train) split of complex expressions, disjoint as strings."""
    return arithmetic_dataset("complex", n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
                              max_operand=max_operand, p_two_operators=p_two_operators)


def stream_batches(tokenizer: ArithmeticTokenizer, batch_size: int, held_out: Sequence[Problem], seed: int = 0,
                   reverse_answer: bool = True, max_operand: int = 50, p_two_operators: float = 0.8,
                   curriculum_steps: int = 0, curriculum_start: int = 9, scratchpad: bool = False,
                   device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of fresh expressions drawn on ``device``; none of ``held_out`` ever appears.
    ``scratchpad``: targets as ``sample_problem_tensors(..., scratchpad=True)`` writes them."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    exclude = torch.tensor([expression_key(p.expression) for p in held_out], dtype=torch.long, device=device)
    step = 0
    while True:
        top = max_operand
        if curriculum_steps and step < curriculum_steps:
            top = int(round(curriculum_start + (max_operand - curriculum_start) * step / curriculum_steps))
        # draw a little extra so that dropping held-out keys still leaves a full batch
        out = sample_problem_tensors(batch_size + batch_size // 16 + 8, tokenizer, generator, max_operand=top,
                                     p_two_operators=p_two_operators, reverse_answer=reverse_answer,
                                     exclude_keys=exclude, device=device, scratchpad=scratchpad)
        yield {k: out[k][:batch_size] for k in ("input_ids", "attention_mask", "labels")}
        step += 1


def fixed_batches(problems: Sequence[Problem], tokenizer: ArithmeticTokenizer, batch_size: int, seed: int = 0,
                  reverse_answer: bool = True, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs over a fixed list of problems (tensors built once, kept on ``device``)."""
    data = ArithmeticDataset(problems, tokenizer, reverse_answer=reverse_answer)
    tensors = {k: getattr(data, k).to(device) for k in ("input_ids", "attention_mask", "labels")}
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in tensors.items()}


SCRATCHPAD_TOKENS = 6  # "2500=" is the longest first-operation value with operands up to 50, and its "="; +1 spare


def answer_tokens(scratchpad: bool = False) -> int:
    """Tokens greedy decoding may generate for one answer (9; more with a scratchpad)."""
    return 9 + (SCRATCHPAD_TOKENS if scratchpad else 0)


@torch.no_grad()
def greedy_answers(model, problems: Sequence[Problem], tokenizer: ArithmeticTokenizer, batch_size: int = 1000,
                   max_new_tokens: int = answer_tokens()) -> list[str]:
    """The text each prompt ``"expr="`` is continued with (greedy, KV cache, stops at ``<eos>``), eos excluded."""
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        ids, mask = pad_batch([tokenizer.encode(p.prompt()) for p in chunk], tokenizer.pad_id, side="left")
        out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, temperature=0.0,
                             attention_mask=mask.to(device), eos_token_id=tokenizer.eos_id,
                             pad_token_id=tokenizer.pad_id)
        texts.extend(tokenizer.decode(row[ids.shape[1]:].cpu()) for row in out)
    return texts


def _categories(problem: Problem) -> dict[str, str]:
    expr = problem.expression
    ops = "".join(ch for ch in expr if ch in "+-*")
    magnitude = abs(problem.answer)
    bucket = "<10" if magnitude < 10 else "<100" if magnitude < 100 else "<1,000" if magnitude < 1000 else \
        "<10,000" if magnitude < 10_000 else ">=10,000"
    return {
        "operators": ops,
        "has_multiplication": "with *" if "*" in ops else "no *",
        "operator_count": f"{len(ops)} operator{'s' if len(ops) > 1 else ''}",
        "parentheses": "(a op b) op c" if expr.startswith("(") else "a op (b op c)" if "(" in expr else "none",
        "answer_magnitude": bucket,
        "answer_sign": "negative" if problem.answer < 0 else "non-negative",
    }


def evaluate_exact_match(model, problems: Sequence[Problem], tokenizer: ArithmeticTokenizer,
                         reverse_answer: bool = True, batch_size: int = 1000,
                         scratchpad: bool = False) -> tuple[float, list[dict[str, Any]]]:
    """Exact-match accuracy of greedy answers, and one record per problem (prediction, correctness, categories).

    With ``scratchpad`` the answer is what follows the last ``=`` of the generated text (the first operation's
    value before it is not scored)."""
    texts = greedy_answers(model, problems, tokenizer, batch_size=batch_size, max_new_tokens=answer_tokens(scratchpad))
    records = []
    for problem, text in zip(problems, texts):
        predicted = parse_target(text, reverse_answer, scratchpad)
        records.append({"expression": problem.expression, "answer": problem.answer, "generated": text,
                        "predicted": predicted, "correct": predicted == problem.answer, **_categories(problem)})
    accuracy = sum(r["correct"] for r in records) / max(1, len(records))
    return accuracy, records


def error_breakdown(records: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Accuracy per value of category ``by`` (e.g. ``"operators"``, ``"parentheses"``, ``"answer_magnitude"``)."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(r[by], []).append(r["correct"])
    order = _CATEGORY_ORDER.get(by, [])
    keys = sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k))
    return [{by: key, "n": len(groups[key]), "accuracy": sum(groups[key]) / len(groups[key])} for key in keys]


_CATEGORY_ORDER = {"answer_magnitude": ["<10", "<100", "<1,000", "<10,000", ">=10,000"],
                   "parentheses": ["none", "(a op b) op c", "a op (b op c)"]}


def train_arithmetic(run: RunConfig, val: Sequence[Problem], test: Sequence[Problem] | None = None,
                     fixed_train: Sequence[Problem] | None = None, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[Phi3ForCausalLM, dict[str, Any]]:
    """Train ``Phi3Config.tiny(**run.model)`` with ``dldna.training.train``; return the model and a summary.

    Every ``run.eval_every`` steps the validation loss' stand-in is the exact match on ``run.n_eval`` validation
    problems. The summary holds the run config, parameter count, history (loss, lr, eval accuracy per step),
    wall time, and, with ``test``, the test exact match.
    """
    device = torch.device(device)
    torch.manual_seed(run.seed)
    tokenizer = ArithmeticTokenizer()
    config = Phi3Config.tiny(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                             eos_token_id=tokenizer.eos_id, **run.model)
    model = Phi3ForCausalLM(config).to(device)
    held_out = list(val) + list(test or [])
    if run.data == "stream":
        batches = stream_batches(tokenizer, run.batch_size, held_out, seed=run.seed, reverse_answer=run.reverse_answer,
                                 max_operand=run.max_operand, p_two_operators=run.p_two_operators,
                                 curriculum_steps=int(run.curriculum * run.steps),
                                 curriculum_start=run.curriculum_start, scratchpad=run.scratchpad,
                                 device=device)
    else:
        if fixed_train is None or len(fixed_train) < run.n_train:
            raise ValueError(f"data='fixed' needs fixed_train with at least n_train={run.n_train} problems")
        overlap = {p.expression for p in fixed_train[:run.n_train]} & {p.expression for p in held_out}
        if overlap:
            raise ValueError(f"fixed_train shares {len(overlap)} expressions with the held-out problems")
        batches = fixed_batches(fixed_train[:run.n_train], tokenizer, run.batch_size, seed=run.seed,
                                reverse_answer=run.reverse_answer, device=device)
    optimizer = make_adamw(model, lr=run.lr, weight_decay=run.weight_decay, betas=(0.9, 0.98))
    warmup = min(run.warmup_steps, run.steps // 5)
    scheduler = cosine_with_warmup(optimizer, warmup, run.steps, min_lr_ratio=run.min_lr_ratio)
    eval_set = list(val)[:run.n_eval]

    def eval_fn(m):
        return {"accuracy": evaluate_exact_match(m, eval_set, tokenizer, run.reverse_answer,
                                                 scratchpad=run.scratchpad)[0]}

    amp = "bf16" if device.type == "cuda" else None
    start = time.perf_counter()
    history = train(model, batches, optimizer, scheduler=scheduler, max_steps=run.steps, grad_clip=1.0,
                    amp_dtype=amp, eval_fn=eval_fn, eval_every=run.eval_every, log_every=10, progress=progress,
                    desc=run.name[:30])
    seconds = time.perf_counter() - start
    model.eval()
    summary = {"run": asdict(run), "parameters": model.num_parameters(), "train_seconds": seconds,
               "history": {k: history[k] for k in ("step", "loss", "lr", "eval_step", "eval_accuracy") if k in history},
               "val_accuracy": history["eval_accuracy"][-1] if history.get("eval_accuracy") else None}
    if test is not None:
        summary["test_accuracy"], _ = evaluate_exact_match(model, test, tokenizer, run.reverse_answer,
                                                           scratchpad=run.scratchpad)
        summary["n_test"] = len(test)
    return model, summary


@torch.no_grad()
def attention_maps(model: Phi3ForCausalLM, problem: Problem, tokenizer: ArithmeticTokenizer,
                   reverse_answer: bool = True, scratchpad: bool = False
                   ) -> tuple[list[str], tuple[torch.Tensor, ...], str]:
    """Greedy answer for one problem, then the attention probabilities over ``prompt + answer``.

    Returns ``(tokens, attentions, answer_text)``; ``attentions[layer]`` is ``(heads, T, T)`` on the CPU.
    """
    answer = greedy_answers(model, [problem], tokenizer, max_new_tokens=answer_tokens(scratchpad))[0]
    text = problem.prompt() + answer
    ids = torch.tensor([tokenizer.encode(text)], device=next(model.parameters()).device)
    out = model(ids, output_attentions=True)
    return tokenizer.tokenize(text), tuple(a[0].float().cpu() for a in out.attentions), answer


def load_trained_model(path: str | None = None) -> tuple[Phi3ForCausalLM, RunConfig]:
    """A model saved by ``--part final``, in eval mode on the CPU.

    Default: ``results/phi3_arithmetic_model_v4.pt``, chapter 11's best run
    (``--part final --steps 9371 --scratchpad --tag _v4``).
    """
    from dldna.results import results_dir

    path = path or str(results_dir() / "phi3_arithmetic_model_v4.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = Phi3ForCausalLM(Phi3Config(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), RunConfig(**saved["run"])


def plot_attention_maps(tokens: Sequence[str], attentions: Sequence[torch.Tensor], title: str = ""):
    """Grid of attention heat maps (rows: layers, columns: heads); query tokens down, key tokens across.

    ``attentions[layer]`` is ``(heads, T, T)`` as returned by :func:`attention_maps`. Returns the figure.
    """
    import matplotlib.pyplot as plt

    n_layers, n_heads = len(attentions), attentions[0].shape[0]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.1 * n_heads, 2.1 * n_layers), squeeze=False)
    labels = ["eos" if t == "<eos>" else t for t in tokens]
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(attentions[layer][head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(labels)), labels, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def calibrate_steps(run: RunConfig, seconds: float, val: Sequence[Problem], device: torch.device,
                    probe_steps: int = 100) -> int:
    """How many optimizer steps of ``run`` fit in ``seconds`` on ``device`` (measured with throwaway models).

    A first short probe warms up (CUDA context, kernels, allocator); the second, timed one includes the training
    loop's own overhead and two evaluations. A 10 % margin is kept. (The first GPU run of this script timed a
    single cold probe, over-estimated the step time six-fold and trained six times too briefly.)
    """
    fixed = None if run.data == "stream" else _FIXED_CACHE["train"]
    warm = replace(run, steps=20, eval_every=10, warmup_steps=0, n_eval=50)
    train_arithmetic(warm, val, None, fixed_train=fixed, device=device, progress=False)
    probe = replace(run, steps=probe_steps, eval_every=probe_steps // 2, warmup_steps=0)
    _, summary = train_arithmetic(probe, val, None, fixed_train=fixed, device=device, progress=False)
    per_step = summary["train_seconds"] / probe_steps
    return max(100, int(0.9 * seconds / per_step))


_FIXED_CACHE: dict[str, list[Problem]] = {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison (``--part comparison``) or the final run (``--part final``) within a time budget.

    Steps are calibrated on the device so that the part fits in ``--budget-s`` seconds of training; all
    comparison runs get the same number of steps. Results go to ``<out>/phi3_arithmetic_<part>.json`` (and
    ``phi3_arithmetic_model.pt`` for the final model) with provenance.
    """
    import sys

    from dldna.config import device as pick_device
    from dldna.results import results_dir, save_result

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", choices=("comparison", "final"), required=True)
    parser.add_argument("--budget-s", type=float, default=100.0, help="training seconds for the whole part")
    parser.add_argument("--steps", type=int, default=None, help="fixed steps per run (skips calibration)")
    parser.add_argument("--batch-size", type=int, default=None, help="override every run's batch size")
    parser.add_argument("--only", type=str, default=None, help="comma-separated indices of COMPARISON to run")
    parser.add_argument("--tag", type=str, default="", help="suffix of the result and model file names")
    parser.add_argument("--scratchpad", action="store_true",
                        help="targets write the first operation's value before the answer (every run)")
    parser.add_argument("--out-dir", type=str, default=None, help="results folder (default: results/)")
    parser.add_argument("--device", type=str, default=None)
    args = parser.parse_args(argv)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    split = held_out_problems(n_train=100_000)  # the same split in both parts (same seed, same sizes)
    val, test = split["val"], split["test"]
    _FIXED_CACHE["train"] = split["train"]
    runs = list(COMPARISON) if args.part == "comparison" else [FINAL]
    if args.only and args.part == "comparison":
        runs = [runs[int(i)] for i in args.only.split(",")]
    if args.batch_size:
        runs = [replace(r, batch_size=args.batch_size) for r in runs]
    if args.scratchpad:
        runs = [replace(r, scratchpad=True, name=f"{r.name}, scratchpad") for r in runs]
    steps = args.steps or calibrate_steps(runs[0], args.budget_s / len(runs), val, device)
    runs = [replace(r, steps=steps, eval_every=max(1, steps // 12)) for r in runs]
    print(f"{args.part}: {len(runs)} run(s) of {steps} steps on {device}", flush=True)
    summaries, model = [], None
    for run in runs:
        model, summary = train_arithmetic(run, val, test, fixed_train=split["train"], device=device, progress=False)
        summaries.append(summary)
        print(f"{run.name}: val {summary['val_accuracy']:.3f}  test {summary['test_accuracy']:.3f}  "
              f"({summary['train_seconds']:.0f} s)", flush=True)
    data: dict[str, Any] = {"runs": summaries, "steps": steps,
                            "test_split": {"n": len(test), "seed": 1234, "disjoint_from_training": True}}
    out_dir = args.out_dir or str(results_dir())
    if args.part == "final":
        tokenizer = ArithmeticTokenizer()
        _, records = evaluate_exact_match(model, test, tokenizer, runs[0].reverse_answer,
                                          scratchpad=runs[0].scratchpad)
        data["test_records"] = records
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"config": model.config.to_dict(), "state_dict": state, "run": asdict(runs[0])},
                   f"{out_dir}/phi3_arithmetic_model{args.tag}.pt")
    save_result(f"phi3_arithmetic_{args.part}{args.tag}", data, "python -m dldna.experiments.arithmetic_lm " + argv_text,
                out_dir=out_dir)
    return data


if __name__ == "__main__":
    main()
