"""Arithmetic-expression data for the small decoder chapters: a safe evaluator, generators, a split, a tokenizer.

The printed book labelled its generated expressions with Python's ``eval`` builtin and measured accuracy on
samples drawn from the training data. Here labels come from :func:`safe_eval` (an AST walker that accepts integer
arithmetic and nothing else), and :func:`arithmetic_dataset` splits *distinct expression strings* into train /
validation / test, so no test expression is ever seen in training.

Text format of one example (the printed one): ``"12+7*3=33<eos>"``. With ``reverse_answer=True`` the answer's
digits are written least-significant first (``"9*12=108<eos>"`` -> ``"9*12=801<eos>"``), the order in which
carries are produced; a leading minus sign stays in front (``-123`` -> ``"-321"``).

Typical use::

    split = arithmetic_dataset("complex", n_train=20_000, n_val=1_000, n_test=1_000, seed=0)
    tok = ArithmeticTokenizer()
    train = ArithmeticDataset(split["train"], tok)        # tensors for a causal LM, labels -100 on prompt/pad
    problem = split["test"][0]                              # Problem(expression='(3+41)*7', answer=308)
    prompt = problem.prompt()                               # '(3+41)*7='

Used in chapters 10 (Mistral) and 11 (Phi-3).
"""
from __future__ import annotations

import ast
import random
import re
from typing import NamedTuple, Sequence

import torch
from torch.utils.data import Dataset

__all__ = [
    "safe_eval",
    "simple_expression",
    "complex_expression",
    "Problem",
    "arithmetic_dataset",
    "format_answer",
    "parse_answer",
    "inner_value",
    "format_target",
    "parse_target",
    "ArithmeticTokenizer",
    "ArithmeticDataset",
    "pad_batch",
    "expression_key",
    "sample_problem_tensors",
]

# ----------------------------------------------------------------------------------------------------------
# Safe evaluation
# ----------------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 1_000
MAX_ABS_VALUE = 10**30  # bound on every literal and every intermediate result
MAX_EXPONENT = 64
_ALLOWED_CHARS = set("0123456789+-*/%() \t")


def _check_size(value: int, expr: str) -> int:
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError(f"expr {expr!r}: intermediate value exceeds {MAX_ABS_VALUE:.0e} in magnitude")
    return value


def _eval_node(node: ast.AST, expr: str) -> int:
    if isinstance(node, ast.Constant):
        # bool is a subclass of int: reject it explicitly (``True`` cannot appear anyway: letters are filtered).
        if type(node.value) is not int:
            raise ValueError(f"expr {expr!r}: only integer literals are allowed, got {node.value!r}")
        return _check_size(node.value, expr)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left, expr), _eval_node(node.right, expr)
        op = node.op
        if isinstance(op, ast.Add):
            return _check_size(left + right, expr)
        if isinstance(op, ast.Sub):
            return _check_size(left - right, expr)
        if isinstance(op, ast.Mult):
            return _check_size(left * right, expr)
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            if right == 0:
                raise ValueError(f"expr {expr!r}: division by zero")
            return left // right if isinstance(op, ast.FloorDiv) else left % right
        if isinstance(op, ast.Pow):
            if right < 0 or right > MAX_EXPONENT:
                raise ValueError(f"expr {expr!r}: exponent must be in [0, {MAX_EXPONENT}], got {right}")
            # |left|**right <= 2**(bits*right): refuse before computing anything huge.
            if abs(left) > 1 and abs(left).bit_length() * right > MAX_ABS_VALUE.bit_length() + 1:
                raise ValueError(f"expr {expr!r}: power too large")
            return _check_size(left**right, expr)
        raise ValueError(f"expr {expr!r}: operator {type(op).__name__} is not allowed (use + - * // % **)")
    raise ValueError(f"expr {expr!r}: {type(node).__name__} is not allowed (integer arithmetic only)")


def safe_eval(expr: str) -> int:
    """Value of an integer arithmetic expression, without ``eval``.

    Accepts integer literals, binary ``+ - * // % **``, unary ``-``/``+`` and parentheses (Python precedence).
    Anything else raises ``ValueError``: names, calls, attributes, subscripts, floats, true division ``/``,
    literals like ``0x10`` / ``1e3`` / ``1_000``, division by zero, exponents outside ``[0, 64]``, any value
    above ``1e30`` in magnitude, and strings longer than 1,000 characters. ``TypeError`` if ``expr`` is not a str.

    >>> safe_eval("(12+7)*3"), safe_eval("-4*-(2-9)")
    (57, -28)
    """
    if not isinstance(expr, str):
        raise TypeError(f"expr must be a str, got {type(expr).__name__}")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expr is longer than {MAX_EXPRESSION_CHARS} characters ({len(expr)})")
    bad = sorted(set(expr) - _ALLOWED_CHARS)
    if bad:
        raise ValueError(f"expr {expr!r}: characters {''.join(bad)!r} are not allowed")
    if not expr.strip():
        raise ValueError("expr is empty")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ValueError(f"expr {expr!r} is not a valid expression: {err}") from None
    try:
        return _eval_node(tree.body, expr)
    except RecursionError:
        raise ValueError(f"expr {expr!r} is nested too deeply") from None


# ----------------------------------------------------------------------------------------------------------
# Expression generators
# ----------------------------------------------------------------------------------------------------------


def _check_operands(min_operand: int, max_operand: int, operators: str) -> None:
    if not isinstance(max_operand, int) or not isinstance(min_operand, int):
        raise TypeError("min_operand and max_operand must be ints")
    if min_operand < 0 or max_operand < min_operand:
        raise ValueError(f"need 0 <= min_operand <= max_operand, got min_operand={min_operand}, max_operand={max_operand}")
    if not operators or set(operators) - set("+-*"):
        raise ValueError(f"operators must be a non-empty subset of '+-*', got {operators!r}")


def simple_expression(rng: random.Random, max_operand: int = 20, min_operand: int = 0, operators: str = "+-*") -> str:
    """One two-operand expression ``"a op b"`` with ``a, b`` uniform in ``[min_operand, max_operand]``."""
    _check_operands(min_operand, max_operand, operators)
    a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
    return f"{a}{rng.choice(operators)}{b}"


def complex_expression(
    rng: random.Random,
    max_operand: int = 50,
    min_operand: int = 0,
    operators: str = "+-*",
    p_two_operators: float = 0.8,
) -> str:
    """One expression with one or two operators and optional parentheses, as in the printed example.

    With probability ``p_two_operators``: ``a op b op c``, ``(a op b) op c`` or ``a op (b op c)`` (each 1/3);
    otherwise ``a op b``. Operands are uniform in ``[min_operand, max_operand]``; operators from ``operators``.
    """
    _check_operands(min_operand, max_operand, operators)
    if not 0.0 <= p_two_operators <= 1.0:
        raise ValueError(f"p_two_operators must be in [0, 1], got {p_two_operators}")
    num = lambda: rng.randint(min_operand, max_operand)  # noqa: E731
    if rng.random() >= p_two_operators:
        return f"{num()}{rng.choice(operators)}{num()}"
    a, b, c = num(), num(), num()
    op1, op2 = rng.choice(operators), rng.choice(operators)
    pattern = rng.randrange(3)
    if pattern == 0:
        return f"{a}{op1}{b}{op2}{c}"
    if pattern == 1:
        return f"({a}{op1}{b}){op2}{c}"
    return f"{a}{op1}({b}{op2}{c})"


class Problem(NamedTuple):
    """One arithmetic problem: the expression string and its value (from :func:`safe_eval`)."""

    expression: str
    answer: int

    def prompt(self) -> str:
        """What the model sees before answering: ``"expression="``."""
        return f"{self.expression}="

    def text(self, reverse_answer: bool = False, eos: str = "<eos>") -> str:
        """Full training text ``"expression=answer<eos>"`` (answer digits reversed if ``reverse_answer``)."""
        return f"{self.expression}={format_answer(self.answer, reverse_answer)}{eos}"


_GENERATORS = {"simple": simple_expression, "complex": complex_expression}


def arithmetic_dataset(
    kind: str = "complex",
    n_train: int = 20_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
    seed: int = 0,
    **generator_kwargs,
) -> dict[str, list[Problem]]:
    """Train / validation / test problems that share no expression string.

    ``kind`` is ``"simple"`` (:func:`simple_expression`, operands up to 20 by default) or ``"complex"``
    (:func:`complex_expression`, operands up to 50, one or two operators); ``generator_kwargs`` go to the
    generator (``max_operand``, ``min_operand``, ``operators``, ``p_two_operators``). Distinct expressions are
    drawn with a seeded ``random.Random(seed)`` until ``n_train + n_val + n_test`` are collected, shuffled, then
    dealt out, so the three lists are disjoint as strings and identically distributed. Raises ``ValueError`` when the generator
    cannot produce that many distinct expressions (e.g. 5,000 simple expressions with operands up to 20:
    only 21*21*3 = 1,323 exist). Returns ``{"train": [...], "val": [...], "test": [...]}`` of :class:`Problem`.
    """
    if kind not in _GENERATORS:
        raise ValueError(f"kind must be one of {sorted(_GENERATORS)}, got {kind!r}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    generate = _GENERATORS[kind]
    rng = random.Random(seed)
    total = n_train + n_val + n_test
    seen: dict[str, None] = {}  # insertion-ordered set
    attempts, max_attempts = 0, 50 * total + 20_000
    while len(seen) < total:
        if attempts >= max_attempts:
            raise ValueError(
                f"could only draw {len(seen)} distinct {kind} expressions out of the {total} requested "
                f"with {generator_kwargs or 'default settings'}; lower the sizes or raise max_operand"
            )
        attempts += 1
        seen.setdefault(generate(rng, **generator_kwargs))
    expressions = list(seen)
    # Shuffle before dealing: when a sub-space saturates (only 7,803 one-operator expressions exist with
    # operands up to 50) late draws are biased towards the rest, and every split must see the same mix.
    rng.shuffle(expressions)
    problems = [Problem(expr, safe_eval(expr)) for expr in expressions]
    return {
        "train": problems[:n_train],
        "val": problems[n_train : n_train + n_val],
        "test": problems[n_train + n_val :],
    }


# ----------------------------------------------------------------------------------------------------------
# Answer formatting
# ----------------------------------------------------------------------------------------------------------


def format_answer(value: int, reverse: bool = False) -> str:
    """``str(value)``, or with ``reverse`` its digits least-significant first, sign kept in front (-123 -> "-321")."""
    text = str(int(value))
    if not reverse:
        return text
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    return sign + digits[::-1]


def inner_value(expression: str) -> int | None:
    """Value of the operation a :func:`complex_expression` computes first (``None`` for one operator):
    the parenthesised pair, else ``b*c`` when the second operator is the only ``*``, else the left pair."""
    match = re.fullmatch(r"(\(?)(\d+)([-+*])(\(?)(\d+)(\)?)([-+*])(\d+)(\)?)", expression)
    if match is None:
        return None
    left_paren, a, op1, right_paren, b, _, op2, c, _ = match.groups()
    if right_paren or (not left_paren and op2 == "*" and op1 != "*"):
        return safe_eval(f"{b}{op2}{c}")
    return safe_eval(f"{a}{op1}{b}")


def format_target(expression: str, value: int, reverse: bool = False, scratchpad: bool = False) -> str:
    """The text after ``=``: the answer, preceded with ``scratchpad`` by the first operation's value and ``=``."""
    inner = inner_value(expression) if scratchpad else None
    answer = format_answer(value, reverse)
    return answer if inner is None else f"{format_answer(inner, reverse)}={answer}"


def parse_target(text: str, reverse: bool = False, scratchpad: bool = False) -> int | None:
    """The answer in a generated target: :func:`parse_answer` of the text after the last ``=`` (scratchpad)."""
    return parse_answer(text.rsplit("=", 1)[-1] if scratchpad else text, reverse)


def parse_answer(text: str, reverse: bool = False) -> int | None:
    """Inverse of :func:`format_answer`; ``None`` if ``text`` is not a well-formed (possibly reversed) integer."""
    text = text.strip()
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    if not digits or not digits.isdigit() or not digits.isascii():
        return None
    if reverse:
        digits = digits[::-1]
    # A model may emit non-canonical forms ("007"); accept only canonical numbers so exact match stays exact.
    if len(digits) > 1 and digits[0] == "0":
        return None
    if sign and digits == "0":
        return None
    return int(sign + digits)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and tensors
# ----------------------------------------------------------------------------------------------------------


class ArithmeticTokenizer:
    """Character tokenizer for arithmetic text, with ``<pad>`` and ``<eos>`` as single tokens.

    The vocabulary order is the printed book's: digits ``0-9`` -> ids 0-9, ``+ - * =`` -> 10-13,
    ``<pad>`` -> 14, ``<eos>`` -> 15, ``( )`` -> 16, 17 (18 tokens). ``extra_chars`` appends more characters
    (e.g. ``" "`` or ``"/"``) after those.
    """

    BASE_TOKENS = tuple("0123456789") + ("+", "-", "*", "=", "<pad>", "<eos>", "(", ")")
    SPECIAL_TOKENS = ("<pad>", "<eos>")

    def __init__(self, extra_chars: str = ""):
        tokens = list(self.BASE_TOKENS)
        for ch in extra_chars:
            if ch in tokens or ch in "<>":
                raise ValueError(f"extra_chars: {ch!r} is already in the vocabulary or reserved")
            tokens.append(ch)
        self.id_to_token: list[str] = tokens
        self.vocab: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        self.pad_id = self.vocab["<pad>"]
        self.eos_id = self.vocab["<eos>"]

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def tokenize(self, text: str) -> list[str]:
        """Characters, except that ``<pad>`` and ``<eos>`` are one token each. ``ValueError`` on unknown chars."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        tokens, i = [], 0
        while i < len(text):
            for special in self.SPECIAL_TOKENS:
                if text.startswith(special, i):
                    tokens.append(special)
                    i += len(special)
                    break
            else:
                if text[i] not in self.vocab:
                    raise ValueError(f"text {text!r}: character {text[i]!r} is not in the vocabulary")
                tokens.append(text[i])
                i += 1
        return tokens

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (plus ``eos_id`` if ``add_eos``)."""
        ids = [self.vocab[t] for t in self.tokenize(text)]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, stop_at_eos: bool = True, skip_pad: bool = True) -> str:
        """Text of ``ids``; stops at the first ``<eos>`` (not included) if ``stop_at_eos``; drops ``<pad>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {self.vocab_size})")
            if i == self.eos_id and stop_at_eos:
                break
            if i == self.pad_id and skip_pad:
                continue
            out.append(self.id_to_token[i])
        return "".join(out)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right", length: int | None = None):
    """Stack id lists into ``input_ids`` and ``attention_mask`` ``(B, L)`` (long), padded on ``side``.

    ``side="left"`` is what batched generation needs (every prompt ends at the last column).
    ``length`` defaults to the longest sequence; longer sequences raise ``ValueError``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("sequences is empty")
    longest = max(len(s) for s in sequences)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


class ArithmeticDataset(Dataset):
    """Causal-LM tensors for a list of :class:`Problem`: ``input_ids``, ``attention_mask``, ``labels``, each ``(L,)``.

    Each row is ``prompt + answer + <eos>``, right-padded with ``<pad>`` to ``max_length`` (default: the
    longest example). ``labels`` equal ``input_ids`` (the model shifts them, as in HF) with ``-100`` on
    padding, and also on the prompt when ``answer_only_loss`` (the default), so the loss measures only the
    answer; ``<eos>`` is always a target, so the model learns where to stop.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        tokenizer: ArithmeticTokenizer,
        max_length: int | None = None,
        reverse_answer: bool = False,
        answer_only_loss: bool = True,
    ):
        if len(problems) == 0:
            raise ValueError("problems is empty")
        self.problems = list(problems)
        self.tokenizer = tokenizer
        self.reverse_answer = reverse_answer
        prompts = [tokenizer.encode(p.prompt()) for p in self.problems]
        full = [tokenizer.encode(p.text(reverse_answer)) for p in self.problems]
        longest = max(len(f) for f in full)
        self.max_length = longest if max_length is None else max_length
        if longest > self.max_length:
            raise ValueError(f"max_length={max_length} is shorter than the longest example ({longest} tokens)")
        self.input_ids, self.attention_mask = pad_batch(full, tokenizer.pad_id, "right", self.max_length)
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)
        if answer_only_loss:
            for row, prompt in enumerate(prompts):
                self.labels[row, : len(prompt)] = -100

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "labels": self.labels[idx]}


# ----------------------------------------------------------------------------------------------------------
# Vectorised sampling (GPU-friendly), for training streams of fresh expressions
# ----------------------------------------------------------------------------------------------------------

_OPERATOR_CODES = {"+": 0, "-": 1, "*": 2}
_HOLE = -1


def expression_key(expression: str) -> int:
    """A unique integer for a :func:`complex_expression` / :func:`simple_expression` string (its structure).

    The key encodes (number of operators, parenthesis pattern, operands, operators), so two expressions share a
    key iff they are the same string. :func:`sample_problem_tensors` returns the same keys for what it draws,
    which is how a training stream leaves out every validation and test expression.
    """
    import re

    tokens = re.findall(r"\d+|[-+*()]", expression)
    if "".join(tokens) != expression.replace(" ", ""):
        raise ValueError(f"expression {expression!r} is not a generated arithmetic expression")
    pattern = 1 if tokens[0] == "(" else (2 if "(" in tokens else 0)
    nums = [int(t) for t in tokens if t.isdigit()]
    ops = [_OPERATOR_CODES[t] for t in tokens if t in _OPERATOR_CODES]
    if len(nums) not in (2, 3) or len(ops) != len(nums) - 1 or max(nums) >= _KEY_RADIX:
        raise ValueError(f"expression {expression!r}: expected 2 or 3 operands below {_KEY_RADIX}")
    if len(nums) == 2:
        nums, ops, pattern, two = nums + [0], ops + [0], 0, 0
    else:
        two = 1
    return _key(two, pattern, *nums, *ops)


_KEY_RADIX = 1000  # operands below 1000; the key does not depend on max_operand, so curricula can change it


def _key(two, pattern, a, b, c, op1, op2):
    m = _KEY_RADIX
    return (((((two * 3 + pattern) * m + a) * m + b) * m + c) * 3 + op1) * 3 + op2


def _apply(x: torch.Tensor, op: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(op == 0, x + y, torch.where(op == 1, x - y, x * y))


def sample_problem_tensors(
    n: int,
    tokenizer: ArithmeticTokenizer,
    generator: torch.Generator | None = None,
    max_operand: int = 50,
    min_operand: int = 0,
    p_two_operators: float = 0.8,
    reverse_answer: bool = False,
    exclude_keys: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    scratchpad: bool = False,
) -> dict[str, torch.Tensor]:
    """Draw ``n`` expressions like :func:`complex_expression` directly as tensors (no Python loop over samples).

    ``scratchpad``: a two-operator expression's target first writes the value of the operation done first, then
    ``=`` and the answer (``(19+25)*40=44=1760``; see :func:`inner_value`), so each generated number is one
    operation on two numbers. One-operator targets are unchanged. Read the answer after the last ``=``.

    Same distribution as ``complex_expression`` (``p_two_operators=0`` gives ``simple_expression``'s), values
    computed with integer tensor arithmetic and Python's precedence (checked against :func:`safe_eval` in the
    tests). Draws whose :func:`expression_key` is in ``exclude_keys`` (a 1-D long tensor, e.g. the keys of the
    validation and test problems) are dropped, so slightly fewer than ``n`` rows may come back.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``(n', L)`` laid out as :class:`ArithmeticDataset`
    does (right padding, ``-100`` on prompt and padding), plus ``keys`` ``(n',)`` and ``values`` ``(n',)``.
    """
    if not 0 <= min_operand <= max_operand <= 999:
        raise ValueError(f"need 0 <= min_operand <= max_operand <= 999, got {min_operand}, {max_operand}")
    if not 0.0 <= p_two_operators <= 1.0:
        raise ValueError(f"p_two_operators must be in [0, 1], got {p_two_operators}")
    dev = torch.device(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def randint(low, high):
        return torch.randint(low, high, (n,), generator=generator, device=gen_device).to(dev)

    a, b, c = randint(min_operand, max_operand + 1), randint(min_operand, max_operand + 1), randint(min_operand, max_operand + 1)
    op1, op2, pattern = randint(0, 3), randint(0, 3), randint(0, 3)
    two = torch.rand(n, generator=generator, device=gen_device).to(dev) < p_two_operators
    zero = torch.zeros_like(a)
    pattern, c, op2 = torch.where(two, pattern, zero), torch.where(two, c, zero), torch.where(two, op2, zero)
    left = _apply(_apply(a, op1, b), op2, c)  # (a op1 b) op2 c
    right = _apply(a, op1, _apply(b, op2, c))  # a op1 (b op2 c)
    # the right pair goes first when parenthesised, or when '*' binds tighter; otherwise left to right
    right_first = (pattern == 2) | ((pattern == 0) & (op2 == 2) & (op1 != 2))
    value = torch.where(right_first, right, left)
    value = torch.where(two, value, _apply(a, op1, b))
    inner = torch.where(right_first, _apply(b, op2, c), _apply(a, op1, b))  # the operation done first
    keys = _key(two.long(), pattern, a, b, c, op1, op2)
    if exclude_keys is not None and exclude_keys.numel():
        keep = ~torch.isin(keys, exclude_keys.to(dev))
        a, b, c, op1, op2, pattern, two, value, inner, keys = (
            t[keep] for t in (a, b, c, op1, op2, pattern, two, value, inner, keys))
    m = a.shape[0]
    v = tokenizer.vocab
    op_ids = torch.tensor([v["+"], v["-"], v["*"]], device=dev)
    hole = torch.full((m,), _HOLE, device=dev, dtype=torch.long)

    def tok(symbol, where):
        return torch.where(where, torch.full_like(hole, v[symbol]), hole)

    operand_digits = len(str(max_operand))

    def number(x):  # most significant digit first, leading zeros as holes (0 itself keeps one digit)
        cols = []
        for p in reversed(range(operand_digits)):
            digit = (x // 10**p) % 10
            cols.append(torch.where((x >= 10**p) | (p == 0), digit, hole))
        return cols

    slots = [tok("(", two & (pattern == 1)), *number(a), op_ids[op1], tok("(", two & (pattern == 2)), *number(b),
             tok(")", two & (pattern == 1)), torch.where(two, op_ids[op2], hole),
             *[torch.where(two, col, hole) for col in number(c)], tok(")", two & (pattern == 2)), tok("=", two | ~two)]
    prompt_len = torch.stack(slots, 1).ne(_HOLE).sum(1)

    def signed_number(x, digits, where):  # sign, then digits in the answer's order; holes where ``where`` is False
        cols = [tok("-", where & (x < 0))]
        powers = range(digits) if reverse_answer else reversed(range(digits))
        for p in powers:
            cols.append(torch.where(where & ((x.abs() >= 10**p) | (p == 0)), (x.abs() // 10**p) % 10, hole))
        return cols

    if scratchpad:
        slots += signed_number(inner, len(str(max(max_operand**2, 2 * max_operand))), two)
        slots.append(tok("=", two))
    slots += signed_number(value, len(str(max(max_operand**3, 2 * max_operand))), two | ~two)
    slots.append(torch.full_like(hole, tokenizer.eos_id))
    wide = torch.stack(slots, dim=1)
    is_hole = wide.eq(_HOLE)
    order = torch.sort(is_hole.to(torch.uint8), dim=1, stable=True).indices  # real tokens first, in order
    packed = wide.gather(1, order)
    length = int((~is_hole).sum(1).max()) if m else 1
    packed = packed[:, :length]
    attention_mask = packed.ne(_HOLE).long()
    input_ids = packed.masked_fill(packed.eq(_HOLE), tokenizer.pad_id)
    positions = torch.arange(length, device=dev)[None]
    labels = input_ids.masked_fill((attention_mask == 0) | (positions < prompt_len[:, None]), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "keys": keys, "values": value}
