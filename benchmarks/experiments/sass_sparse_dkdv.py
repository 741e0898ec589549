"""Scratch: the SASS of the block-sparse dK/dV kernel as the device's Triton compiles it, for two flash_triton versions.

Runs one BigBird forward+backward (N=16k, D=64, 64 x 64 tiles, 4 warps, 3 stages) with each version, dumps the
compiled dK/dV kernel's SASS (``cuobjdump``, shipped with triton) to ``$OUT/dkdv_<version>.sass`` and prints its
registers, spills and the instruction count of each loop (a backward branch closes a loop). This showed why
filling LSE2 with +inf cost 9 % (``logs/ab_sparse_inf_fill.json``): 730 instructions per step, against 644 at
``64b8023`` and 596 once the rows were zero-filled (``aff092b``).

    git show 19b22ff:dldna/kernels/flash_triton.py > /tmp/flash_triton_other.py
    PYTHONPATH=$PWD python benchmarks/experiments/sass_sparse_dkdv.py /tmp/flash_triton_other.py
"""
import collections
import importlib
import os
import re
import subprocess
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
from benchmarks.attention import _layout  # noqa: E402
from benchmarks.experiments.ab_kernels import load_module  # noqa: E402
from dldna.kernels import block_sparse_flash_attention  # noqa: E402

fa = importlib.import_module("dldna.kernels.flash_attention")


def loops(sass: str) -> list[tuple[int, int, list[str]]]:
    """``(first address, last address, instructions)`` of every loop in ``sass`` (``cuobjdump -sass`` text): the
    code from a backward branch's target to the branch, in the order of the branches."""
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(code)}
    found = []
    for i, (addr, text) in enumerate(code):
        branch = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr and int(branch.group(1), 16) in index:
            start = int(branch.group(1), 16)
            found.append((start, addr, [t for _, t in code[index[start]: i + 1]]))
    return found


def opcode(instruction: str) -> str:
    """The opcode of one SASS instruction, with its modifiers (``MUFU.EX2``), after any predicate (``@P0``)."""
    return instruction.split()[1 if instruction.startswith("@") else 0]


def opcode_counts(body: list[str], top: int = 8) -> dict[str, int]:
    """The ``top`` most common opcodes of a list of SASS instructions (predicates and modifiers dropped)."""
    ops = collections.Counter(opcode(t).split(".")[0] for t in body)
    return dict(ops.most_common(top))


def loop_sizes(sass: str) -> list[tuple[int, dict]]:
    """(instructions, the most common opcodes) of every loop: the code from a backward branch's target to it."""
    return [(len(body), opcode_counts(body)) for _, _, body in loops(sass)]


def main():
    versions = {"other": load_module(sys.argv[1], "flash_triton_other"), "tree": fa._kernels}
    n, d = 16384, 64
    q, k, v = (torch.randn(1, 32, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    layout = _layout(n).cuda()
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out_dir = os.environ.get("OUT", "/tmp")
    for name, module in versions.items():
        fa._kernels = module
        for kernel in ("fwd", "dq", "dkdv"):
            module.force_config(kernel, module.KernelConfig(64, 64, 4, 3))
        out = block_sparse_flash_attention(q, k, v, layout, 128)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        for cache in module._attn_bwd_dkdv.device_caches.values():
            for compiled in cache[0].values():
                cubin = os.path.join(out_dir, f"dkdv_{name}.cubin")
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                      text=True).stdout
                with open(os.path.join(out_dir, f"dkdv_{name}.sass"), "w") as f:
                    f.write(sass)
                print(name, "registers", compiled.n_regs, "spills", compiled.n_spills, "loops", loop_sizes(sass))


if __name__ == "__main__":
    main()
