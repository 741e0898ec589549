"""dldna.data.arithmetic: safe evaluation, disjoint splits, tokenizer round trips, causal-LM tensors."""
import ast
import random

import pytest
import torch

from dldna.data.arithmetic import (
    ArithmeticDataset,
    ArithmeticTokenizer,
    Problem,
    arithmetic_dataset,
    complex_expression,
    format_answer,
    pad_batch,
    parse_answer,
    safe_eval,
    simple_expression,
)


@pytest.mark.parametrize(
    "expr, value",
    [("12+7*3", 33), ("(12+7)*3", 57), ("12+(7*3)", 33), ("50-49*2", -48), ("-4*-(2-9)", -28),
     ("7//2", 3), ("-7//2", -4), ("7%3", 1), ("2**10", 1024), ("  3 - 5 ", -2), ("0", 0), ("+5", 5)],
)
def test_safe_eval_accepts_integer_arithmetic(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('true')", "x+1", "abs(-3)", "(1).real", "1.5+2", "1e3", "0x10", "1_000",
     "[1][0]", "1/2", "1//0", "5%0", "9**9**9", "2**200", "10**31", "99999999999999999999999999999*999999",
     "2**-1", "True+1", "1+", "", "   ", "(" * 300 + "1" + ")" * 300, "1" * 1001, "lambda: 1", "1 if 1 else 2"],
)
def test_safe_eval_rejects_everything_else(expr):
    with pytest.raises(ValueError):
        safe_eval(expr)


def test_safe_eval_rejects_non_strings():
    with pytest.raises(TypeError):
        safe_eval(3)


def _python_value(expr):
    # Independent oracle for generated data: Python's own evaluator on a tree we have checked is plain arithmetic.
    tree = ast.parse(expr, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.USub)
    assert all(isinstance(node, allowed) for node in ast.walk(tree))
    return eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}})  # noqa: S307 - checked tree, test oracle


def test_generators_and_labels_agree_with_python():
    rng = random.Random(1)
    exprs = [complex_expression(rng) for _ in range(2000)] + [simple_expression(rng) for _ in range(500)]
    for expr in exprs:
        assert safe_eval(expr) == _python_value(expr)
    n_ops = [sum(c in "+-*" for c in e) for e in exprs[:2000]]
    assert set(n_ops) == {1, 2}
    assert any("(" in e for e in exprs) and all(e.count("(") == e.count(")") <= 1 for e in exprs)
    numbers = [int(t) for e in exprs[:2000] for t in e.replace("(", " ").replace(")", " ").replace("+", " ")
               .replace("-", " ").replace("*", " ").split()]
    assert min(numbers) == 0 and max(numbers) == 50
    assert max(int(t) for e in exprs[2000:] for t in e.replace("+", " ").replace("-", " ").replace("*", " ").split()) == 20


def test_split_is_disjoint_by_expression_and_reproducible():
    split = arithmetic_dataset("complex", n_train=3000, n_val=300, n_test=1000, seed=3)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 3000, "val": 300, "test": 1000}
    train, val, test = ({p.expression for p in split[k]} for k in ("train", "val", "test"))
    assert len(train) == 3000 and len(val) == 300 and len(test) == 1000  # no duplicates inside a split
    assert not (train & test) and not (train & val) and not (val & test)
    assert all(p.answer == safe_eval(p.expression) for p in split["test"])
    again = arithmetic_dataset("complex", n_train=3000, n_val=300, n_test=1000, seed=3)
    assert again == split
    assert arithmetic_dataset("complex", n_train=3000, n_val=300, n_test=1000, seed=4) != split


def test_split_refuses_more_expressions_than_exist():
    # operands 0..20 and 3 operators give 21*21*3 = 1323 distinct simple expressions.
    full = arithmetic_dataset("simple", n_train=1300, n_val=0, n_test=23, seed=0)
    assert len({p.expression for p in full["train"] + full["test"]}) == 1323
    with pytest.raises(ValueError, match="distinct"):
        arithmetic_dataset("simple", n_train=1300, n_val=0, n_test=24, seed=0)
    with pytest.raises(ValueError, match="kind"):
        arithmetic_dataset("cubic")


@pytest.mark.parametrize("value", [0, 7, 10, 108, -5, -120, 125000])
def test_answer_format_round_trip(value):
    for reverse in (False, True):
        assert parse_answer(format_answer(value, reverse), reverse) == value
    assert format_answer(108, True) == "801" and format_answer(-120, True) == "-021"


@pytest.mark.parametrize("text", ["", "-", "1-2", "007", "-0", "1a", "٣"])
def test_parse_answer_rejects_malformed(text):
    assert parse_answer(text) is None


def test_tokenizer_matches_printed_layout_and_round_trips():
    tok = ArithmeticTokenizer()
    assert tok.vocab_size == 18 and tok.pad_id == 14 and tok.eos_id == 15
    assert tok.vocab["("] == 16 and tok.vocab["*"] == 12
    text = "(12+7)*3=57<eos>"
    ids = tok.encode(text)
    assert len(ids) == len("(12+7)*3=57") + 1 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "(12+7)*3=57"
    assert tok.decode(ids + [tok.pad_id], stop_at_eos=False) == "(12+7)*3=57<eos>"
    with pytest.raises(ValueError):
        tok.encode("1/2")


def test_dataset_masks_prompt_and_padding():
    tok = ArithmeticTokenizer()
    problems = [Problem("3+4", 7), Problem("(12+7)*3", 57)]
    data = ArithmeticDataset(problems, tok, reverse_answer=True)
    first = data[0]
    assert first["input_ids"].shape == (12,)
    assert tok.decode(first["input_ids"]) == "3+4=7"
    assert first["labels"].tolist() == [-100] * 4 + [7, tok.eos_id] + [-100] * 6
    assert first["attention_mask"].tolist() == [1] * 6 + [0] * 6
    assert tok.decode(data[1]["input_ids"]) == "(12+7)*3=75"  # reversed answer
    full = ArithmeticDataset(problems, tok, answer_only_loss=False)
    assert (full[0]["labels"][:6] == full[0]["input_ids"][:6]).all()


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="right", length=4)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]] and mask.dtype == torch.long
    with pytest.raises(ValueError):
        pad_batch([[1, 2, 3]], pad_id=0, length=2)


@pytest.mark.parametrize("reverse", [False, True])
def test_vectorised_sampler_agrees_with_safe_eval_and_keys(reverse):
    from dldna.data.arithmetic import expression_key, sample_problem_tensors

    tok = ArithmeticTokenizer()
    out = sample_problem_tensors(3000, tok, torch.Generator().manual_seed(0), reverse_answer=reverse)
    texts = [tok.decode(row) for row in out["input_ids"]]
    n_ops, parens = set(), set()
    for text, key, value, labels, ids in zip(texts, out["keys"], out["values"], out["labels"], out["input_ids"]):
        expr, answer = text.split("=")
        assert safe_eval(expr) == int(value) == parse_answer(answer, reverse)
        assert expression_key(expr) == int(key)
        # labels: exactly the answer tokens and <eos>
        target = ids[labels != -100].tolist()
        assert target == tok.encode(format_answer(int(value), reverse)) + [tok.eos_id]
        n_ops.add(sum(ch in "+-*" for ch in expr.lstrip("-")))
        parens.add(expr.index("(") if "(" in expr else -1)
    assert n_ops == {1, 2} and len(parens) >= 3
    # the same (expression-level) distribution as complex_expression: about 80 % two-operator expressions
    two = sum(sum(ch in "+-*" for ch in t.split("=")[0]) == 2 for t in texts) / len(texts)
    assert 0.76 < two < 0.84


def test_vectorised_sampler_excludes_held_out_keys():
    from dldna.data.arithmetic import expression_key, sample_problem_tensors

    tok = ArithmeticTokenizer()
    # operands 0..3, one operator: only 4*4*3 = 48 expressions exist; exclude 40 of them
    every = sorted({simple_expression(random.Random(i), max_operand=3) for i in range(2000)})
    assert len(every) == 48
    held_out = torch.tensor([expression_key(e) for e in every[:40]])
    out = sample_problem_tensors(2000, tok, torch.Generator().manual_seed(1), max_operand=3, p_two_operators=0.0,
                                 exclude_keys=held_out)
    seen = {tok.decode(row).split("=")[0] for row in out["input_ids"]}
    assert seen == set(every[40:])
    assert 2000 * 8 / 48 * 0.8 < len(out["keys"]) < 2000 * 8 / 48 * 1.2


def test_scratchpad_targets_write_the_first_operation_then_the_answer():
    from dldna.data.arithmetic import format_target, inner_value, parse_target, sample_problem_tensors

    assert inner_value("(19+25)*40") == 44 and inner_value("19+(25*40)") == 1000
    assert inner_value("19+25*40") == 1000 and inner_value("19*25+40") == 475 and inner_value("3*4*5") == 12
    assert inner_value("7-9") is None
    assert format_target("(19+25)*40", 1760, reverse=True, scratchpad=True) == "44=0671"
    assert parse_target("44=0671", reverse=True, scratchpad=True) == 1760
    assert parse_target("44=", reverse=True, scratchpad=True) is None

    tok = ArithmeticTokenizer()
    for reverse in (False, True):
        plain = sample_problem_tensors(2000, tok, torch.Generator().manual_seed(3), reverse_answer=reverse)
        pad = sample_problem_tensors(2000, tok, torch.Generator().manual_seed(3), reverse_answer=reverse,
                                     scratchpad=True)
        assert torch.equal(plain["keys"], pad["keys"]) and torch.equal(plain["values"], pad["values"])
        for ids, labels, value in zip(pad["input_ids"], pad["labels"], pad["values"]):
            expr = tok.decode(ids).split("=")[0]
            target = format_target(expr, int(value), reverse, scratchpad=True)
            assert tok.decode(ids) == f"{expr}={target}"
            assert ids[labels != -100].tolist() == tok.encode(target) + [tok.eos_id]  # loss on the whole target
            assert parse_target(target, reverse, scratchpad=True) == safe_eval(expr) == int(value)
