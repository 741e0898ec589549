"""Tokens/s of plain vs speculative greedy decoding (chapter 13), on a GPU when one is present.

Trains a target and a draft decoder on the toy languages (``dldna.data.toy_languages``; seconds on a GPU), then
times batch-1 greedy decoding with ``dldna.models.generation.generate`` against
``dldna.models.speculative.speculative_generate(..., temperature=0)`` for several ``k``, checks that both emit the
same tokens, and times one cached target forward against the number of tokens it scores. Results go to
``results/<name>.json`` through ``dldna.results.save_result`` (device, date, versions, command).

    python benchmarks/speculative.py                                 # GPU-sized defaults -> speculative_gpu.json
    python benchmarks/speculative.py --out-dir $OUT                  # on the lent device
    python benchmarks/speculative.py --steps 20 --target-hidden 64 --target-layers 2 --prompts 2 \\
        --new-tokens 16 --dtype fp32 --name speculative_bench_smoke --out-dir /tmp  # CPU smoke test
"""
from __future__ import annotations

import argparse
import time

import torch

from dldna.config import seed_everything
from dldna.data.toy_languages import ToyLanguages
from dldna.experiments.faster_decoding import (decoder_config, forward_cost, speculative_stats, tokens_per_second,
                                               train_lm, val_loss)
from dldna.models.generation import generate
from dldna.models.mistral import MistralForCausalLM
from dldna.models.speculative import speculative_generate
from dldna.results import command_line, save_result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="plain vs speculative greedy decoding, tokens/s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="decoding precision")
    p.add_argument("--steps", type=int, default=1500, help="training steps of target and draft")
    p.add_argument("--target-hidden", type=int, default=512)
    p.add_argument("--target-layers", type=int, default=8)
    p.add_argument("--draft-hidden", type=int, default=64)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--ks", default="1,2,4,6,8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default=None, help="result name (default speculative_gpu / speculative_bench_cpu)")
    p.add_argument("--out-dir", default=None, help="folder for the JSON (default: the checkout's results/)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ks = [int(k) for k in args.ks.split(",")]

    langs = ToyLanguages(num_languages=4, words_per_language=64, seed=0)
    val_ids, _ = langs.sample(128, 96, torch.Generator().manual_seed(10_000))
    prompts, _ = langs.sample(args.prompts, args.prompt_len, torch.Generator().manual_seed(20_000))
    val_ids, prompts = val_ids.to(dev), prompts.to(dev)
    v = langs.vocab_size
    seed_everything(0)
    heads = 8 if args.target_hidden >= 256 else 4
    target = MistralForCausalLM(decoder_config(v, args.target_hidden, args.target_layers, heads=heads))
    train_lm(target, langs, args.steps, device=dev, desc="target")
    seed_everything(1)
    draft = MistralForCausalLM(decoder_config(v, args.draft_hidden, args.draft_layers, heads=2))
    train_lm(draft, langs, args.steps, device=dev, desc="draft")
    losses = {"target": val_loss(target, val_ids), "draft": val_loss(draft, val_ids)}
    target, draft = target.to(dtype).eval(), draft.to(dtype).eval()
    print(f"trained target and draft ({time.perf_counter() - t_start:.0f} s so far)", flush=True)

    n = args.new_tokens
    plain = tokens_per_second(lambda x: generate(target, x, n, temperature=0), prompts, n, args.repeats)
    print(f"plain greedy timed: {plain:.1f} tokens/s ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    rows = []
    for k in ks:
        tps = tokens_per_second(lambda x: speculative_generate(target, draft, x, n, k=k, temperature=0), prompts, n,
                                args.repeats)
        stats = speculative_stats(target, draft, prompts, n, k, 0.0)
        same = sum(torch.equal(speculative_generate(target, draft, r[None], n, k=k, temperature=0).sequences,
                               generate(target, r[None], n, temperature=0)) for r in prompts)
        rows.append({"k": k, "tokens_per_s": tps, "speedup": tps / plain, "acceptance": stats["acceptance"],
                     "tokens_per_target_call": stats["tokens_per_target_call"],
                     "identical_to_greedy": f"{same}/{len(prompts)}"})
        print(f"k={k} timed ({time.perf_counter() - t_start:.0f} s so far)", flush=True)
    data = {"config": vars(args), "params": {"target": sum(x.numel() for x in target.parameters()),
                                              "draft": sum(x.numel() for x in draft.parameters())},
            "val_loss": losses, "plain_tokens_per_s": plain, "speculative": rows,
            "target_forward": forward_cost(target, 256, device=dev),
            "draft_forward": forward_cost(draft, 256, new_tokens=(1,), device=dev)}
    name = args.name or ("speculative_gpu" if dev.type == "cuda" else "speculative_bench_cpu")
    command = command_line("python benchmarks/speculative.py", argv)
    path = save_result(name, data, command, out_dir=args.out_dir)
    print(f"target {data['params']['target']:,} params (val loss {losses['target']:.3f}), draft "
          f"{data['params']['draft']:,} (val loss {losses['draft']:.3f}); {args.dtype} on {dev}")
    print(f"plain greedy: {plain:.1f} tokens/s")
    print(" k  tokens/s  speed-up  acceptance  tokens/call  identical")
    for r in rows:
        print(f"{r['k']:>2}  {r['tokens_per_s']:8.1f}  {r['speedup']:8.2f}  {r['acceptance']:10.3f}  "
              f"{r['tokens_per_target_call']:11.2f}  {r['identical_to_greedy']:>9}")
    print("wrote", path)


if __name__ == "__main__":
    main()
