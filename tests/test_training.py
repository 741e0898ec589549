"""Tests for dldna.training: schedules, AdamW groups, accumulation, checkpoints, the loop itself."""
import math

import pytest
import torch
from torch import nn

from dldna.config import seed_everything
from dldna.models.layers import RMSNorm
from dldna.training import (adamw_param_groups, batch_loss, cosine_with_restarts, cosine_with_warmup,
                            cross_entropy, enable_gradient_checkpointing, evaluate, linear_warmup, load_checkpoint,
                            make_adamw, save_checkpoint, train)


def _lrs(make, steps, lr=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_values_at_given_steps():
    lin = _lrs(lambda o: linear_warmup(o, warmup_steps=4), 8, lr=2.0)
    assert lin == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0])
    lin_decay = _lrs(lambda o: linear_warmup(o, warmup_steps=2, total_steps=6), 7)
    assert lin_decay == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    cos = _lrs(lambda o: cosine_with_warmup(o, warmup_steps=2, total_steps=6, min_lr_ratio=0.1), 9)
    # after warmup: 0.1 + 0.9 * 0.5 * (1 + cos(pi * k / 4)), k = 0..4, then the floor
    expect = [0.0, 0.5] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)] + [0.1, 0.1]
    assert cos == pytest.approx(expect)
    restarts = _lrs(lambda o: cosine_with_restarts(o, warmup_steps=0, total_steps=8, num_cycles=2), 9)
    assert restarts == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)),
                                      1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                      0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0])


def test_schedules_equal_hugging_face():
    opt_mod = pytest.importorskip("transformers.optimization")
    cases = [
        (lambda o: linear_warmup(o, 7, 50), lambda o: opt_mod.get_linear_schedule_with_warmup(o, 7, 50)),
        (lambda o: cosine_with_warmup(o, 7, 50), lambda o: opt_mod.get_cosine_schedule_with_warmup(o, 7, 50)),
        (lambda o: cosine_with_warmup(o, 7, 50, min_lr_ratio=0.2),
         lambda o: opt_mod.get_cosine_with_min_lr_schedule_with_warmup(o, 7, 50, min_lr_rate=0.2)),
        (lambda o: cosine_with_restarts(o, 7, 50, num_cycles=3),
         lambda o: opt_mod.get_cosine_with_hard_restarts_schedule_with_warmup(o, 7, 50, num_cycles=3)),
    ]
    for ours, theirs in cases:
        assert _lrs(ours, 50, lr=3e-4) == pytest.approx(_lrs(theirs, 50, lr=3e-4), abs=1e-12)


def test_schedule_arguments_are_validated():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup(opt, -1)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_with_warmup(opt, 10, 5)
    with pytest.raises(ValueError, match="num_cycles"):
        cosine_with_restarts(opt, 1, 10, num_cycles=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        cosine_with_warmup(opt, 1, 10, min_lr_ratio=1.5)


class _Tiny(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.rms = RMSNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.head(self.rms(self.proj(self.norm(self.embed(ids)))))


def test_adamw_param_groups_exclude_norms_biases_embeddings():
    model = _Tiny()
    groups = {g["name"]: g for g in adamw_param_groups(model, 0.1)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert decay == {id(model.proj.weight)}
    assert no_decay == {id(p) for p in (model.embed.weight, model.norm.weight, model.norm.bias, model.rms.weight,
                                        model.proj.bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # tied embedding decayed when asked, and counted once
    groups = {g["name"]: g for g in adamw_param_groups(model, 0.1, decay_embeddings=True)}
    assert {id(p) for p in groups["decay"]["params"]} == {id(model.proj.weight), id(model.embed.weight)}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    opt = make_adamw(model, lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="weight_decay"):
        adamw_param_groups(model, -1.0)


def test_grad_accumulation_equals_big_batch():
    seed_everything(0)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    base = nn.Linear(5, 3).double()
    a, b = nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    mse = nn.functional.mse_loss
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    train(a, [(x, y)], opt_a, loss_fn=mse, epochs=1, progress=False)
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    hist = train(b, micro, opt_b, loss_fn=mse, epochs=1, grad_accum_steps=4, progress=False)
    assert hist["step"] == [1]
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-12)
    assert not torch.equal(a.weight, base.weight)  # a step was actually taken


def test_checkpoint_round_trip(tmp_path):
    seed_everything(1)
    model = _Tiny()
    opt = make_adamw(model, lr=1e-2)
    sched = cosine_with_warmup(opt, 2, 10)
    ids = torch.randint(0, 11, (4, 6))
    loader = [(ids[:, :-1], ids[:, 1:])]
    train(model, loader, opt, scheduler=sched, loss_fn=cross_entropy, max_steps=3, progress=False)
    path = save_checkpoint(tmp_path / "ck.pt", model, opt, sched, step=3, note="hello")
    # weights_only load works on the raw file
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["extra"] == {"note": "hello"}
    model2 = _Tiny()
    opt2 = make_adamw(model2, lr=1e-2)
    sched2 = cosine_with_warmup(opt2, 2, 10)
    info = load_checkpoint(path, model2, opt2, sched2)
    assert info == {"step": 3, "extra": {"note": "hello"}}
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    # continuing both gives identical parameters (optimizer moments were restored)
    train(model, loader, opt, scheduler=sched, loss_fn=cross_entropy, max_steps=2, progress=False)
    train(model2, loader, opt2, scheduler=sched2, loss_fn=cross_entropy, max_steps=2, progress=False)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resume_from_checkpoint_in_train(tmp_path):
    seed_everything(2)
    ids = torch.randint(0, 11, (4, 6))
    loader = [(ids[:, :-1], ids[:, 1:])]
    model = _Tiny()
    opt = make_adamw(model, lr=1e-2)
    hist = train(model, loader, opt, loss_fn=cross_entropy, max_steps=4, checkpoint_path=tmp_path / "a.pt",
                 checkpoint_every=2, progress=False)
    assert hist["step"] == [1, 2, 3, 4]
    model2 = _Tiny()
    opt2 = make_adamw(model2, lr=1e-2)
    hist2 = train(model2, loader, opt2, loss_fn=cross_entropy, max_steps=6, resume_from=tmp_path / "a.pt",
                  progress=False)
    assert hist2["step"] == [5, 6]


def test_overfits_a_tiny_batch_and_logs_history():
    seed_everything(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 5))
    x, y = torch.randn(16, 10), torch.randint(0, 5, (16,))
    loader = [(x, y)]
    opt = make_adamw(model, lr=3e-2, weight_decay=0.0)
    evals = []

    def eval_fn(m):
        evals.append(m.training)
        return evaluate(m, loader, loss_fn=cross_entropy)

    hist = train(model, loader, opt, scheduler=linear_warmup(opt, 5), loss_fn=cross_entropy, max_steps=150,
                 grad_clip=1.0, eval_fn=eval_fn, eval_every=50, progress=False)
    assert hist["step"] == list(range(1, 151))
    assert hist["loss"][0] > 1.2 and hist["loss"][-1] < 0.02  # memorised: log(5) = 1.61 at the start
    assert hist["lr"][:3] == pytest.approx([0.0, 0.006, 0.012])
    assert hist["eval_step"] == [50, 100, 150] and evals == [False] * 3
    assert hist["eval_loss"][-1] == pytest.approx(float(batch_loss(model, loader[0], cross_entropy).detach()), rel=1e-5)
    assert all(g >= 0 for g in hist["grad_norm"]) and hist["tokens"] == 150 * 16  # float inputs count samples
    assert not hist["diverged"] and model.training


def test_grad_clip_and_divergence_stop():
    seed_everything(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1) * 1e3
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    hist = train(model, [(x, y)], opt, loss_fn=nn.functional.mse_loss, max_steps=1, grad_clip=0.5, progress=False)
    assert hist["grad_norm"][0] > 0.5  # measured before clipping
    assert float(torch.cat([model.weight.detach().ravel(), model.bias.detach()]).norm()) < 10
    # a learning rate far too large makes the loss overflow: training stops and says so
    bad = nn.Linear(4, 1)
    opt = torch.optim.SGD(bad.parameters(), lr=1e3)
    hist = train(bad, [(x, y)], opt, loss_fn=nn.functional.mse_loss, max_steps=200, progress=False)
    assert hist["diverged"] and not math.isfinite(hist["loss"][-1]) and len(hist["step"]) < 200


def test_gradient_checkpointing_gives_same_gradients():
    seed_everything(0)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.GELU()) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x.pow(2).mean()

    a = Stack().double()
    b = Stack().double()
    b.load_state_dict(a.state_dict())
    assert enable_gradient_checkpointing(b) == 3
    x = torch.randn(5, 6, dtype=torch.float64)
    a(x).backward()
    b(x).backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_bf16_autocast_on_cpu_when_asked():
    seed_everything(0)
    model = nn.Linear(8, 8)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, [(x, x)], opt, loss_fn=nn.functional.mse_loss, max_steps=1, amp_dtype="bf16", progress=False)
    train(model, [(x, x)], opt, loss_fn=nn.functional.mse_loss, max_steps=1, amp_dtype="bf16", autocast_cpu=True,
          progress=False)
    assert seen == [torch.float32, torch.bfloat16]
    assert model.weight.dtype == torch.float32


def test_train_validates_arguments():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(2, 2), torch.randn(2, 1))]
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train(model, data, opt, grad_accum_steps=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        train(model, data, opt, amp_dtype="int8")
    with pytest.raises(ValueError, match="eval_every"):
        train(model, data, opt, eval_every=5)
    with pytest.raises(TypeError, match="scalar loss"):
        train(model, [torch.randn(2, 2)], opt, progress=False)  # no loss_fn and the model returns no scalar
