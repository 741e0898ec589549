"""WikiSQL (Zhong, Xiong & Socher 2017) questions and their SQL as *logical-form strings* (chapter 10).

Local data (``<data_dir>/wikisql``) holds the dev (8,421) and test (15,878) questions with their ``sql``
dicts ``{"sel": column index, "agg": aggregation index, "conds": [[column, operator, value], ...]}``, but
**not** the train split nor the ``*.tables.jsonl`` files (see ``shared/data/README.md``). Without the tables
the column *names* are unknown, so the target is the logical form with column *indices*, operators spelled as
words (``EQ``, ``GT``, ``LT``; the T5 vocabulary cannot write ``<``)::

    SELECT COUNT col5 WHERE col1 EQ 3 AND col2 GT 1990

Values are written as they appear in the question (the SQL value is always a substring of it), so a model
can copy them. Matching follows WikiSQL's own logical-form accuracy (``lib/query.py``): same ``sel``, same
``agg`` and the same *set* of conditions, string values compared case-insensitively.

Column indices cannot be read from a question alone (dev and test tables are disjoint), so the full
logical form is bounded by guessing them; ``lf_metrics`` therefore also reports the parts that the question
does determine (aggregation, operators, values).
"""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from dldna.config import data_dir

AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")
COND_WORDS = ("EQ", "GT", "LT", "OP")  # operators as written in the logical form: T5's vocabulary has no "<"
SPLIT_FILES = {"dev": "dev", "validation": "dev", "test": "test", "train": "train"}


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_wikisql(split: str = "dev", root: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows ``{"question", "table_id", "sql"}`` of ``split`` (``"dev"``/``"validation"``, ``"test"``, ``"train"``).

    Reads ``<root or data_dir()>/wikisql/<split>.jsonl[.gz]``. Where a split is not stored locally (train, in
    this repository's data) it falls back to the Hugging Face hub through ``datasets`` (online readers only;
    never used in tests or fast mode).
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    base = Path(root) if root is not None else data_dir()
    if base is not None:
        for name in (f"{SPLIT_FILES[split]}.jsonl.gz", f"{SPLIT_FILES[split]}.jsonl"):
            for folder in (base / "wikisql", base):
                if (folder / name).is_file():
                    return _read_jsonl(folder / name)
    return _load_from_hub(split)


def _load_from_hub(split: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError as err:  # pragma: no cover - depends on the reader's setup
        raise FileNotFoundError(
            f"WikiSQL split {split!r} is not stored locally and the `datasets` package is missing; "
            "install it (online) or put <split>.jsonl.gz under DLDNA_DATA_DIR/wikisql") from err
    hub_split = {"dev": "validation"}.get(split, split)
    rows = []
    for r in load_dataset("wikisql", split=hub_split):  # pragma: no cover - needs the network
        sql = r["sql"]
        conds = [[c, o, v] for c, o, v in zip(sql["conds"]["column_index"], sql["conds"]["operator_index"],
                                              sql["conds"]["condition"])]
        rows.append({"question": r["question"], "table_id": r["table"]["id"],
                     "sql": {"sel": sql["sel"], "agg": sql["agg"], "conds": conds}})
    return rows


def _value_text(value: Any) -> str:
    return str(value).strip()


def value_in_question(value: Any, question: str) -> str:
    """``value`` as it is spelled in ``question`` (case-insensitive match), else ``str(value)``."""
    text = _value_text(value)
    start = question.lower().find(text.lower())
    return question[start : start + len(text)] if start >= 0 and text else text


def logical_form(sql: dict, question: str | None = None) -> str:
    """``"SELECT [AGG ]col<sel>[ WHERE col<c> <OP> <value>[ AND ...]]"``; values copied from ``question`` if given.

    ``<OP>`` is one of ``COND_WORDS`` (``EQ``, ``GT``, ``LT``, ``OP``).
    """
    agg = AGG_OPS[sql["agg"]]
    parts = ["SELECT", *( [agg] if agg else []), f"col{sql['sel']}"]
    conds = []
    for col, op, value in sql["conds"]:
        text = value_in_question(value, question) if question is not None else _value_text(value)
        conds.append(f"col{col} {COND_WORDS[op]} {text}")
    if conds:
        parts += ["WHERE", " AND ".join(conds)]
    return " ".join(parts)


_HEAD = re.compile(r"^\s*SELECT\s+(?:(MAX|MIN|COUNT|SUM|AVG)\s+)?col(\d+)\s*(?:WHERE\s+(.*))?$", re.S)
_COND = re.compile(r"^\s*col(\d+)\s+(EQ|GT|LT|OP)\s+(.*?)\s*$", re.S)


def parse_logical_form(text: str) -> dict | None:
    """Inverse of ``logical_form``: ``{"sel", "agg", "conds"}`` with string values, or None if malformed."""
    m = _HEAD.match(text)
    if m is None:
        return None
    agg = AGG_OPS.index(m.group(1)) if m.group(1) else 0
    conds = []
    if m.group(3) is not None:
        for piece in m.group(3).split(" AND "):
            c = _COND.match(piece)
            if c is None or not c.group(3):
                return None
            conds.append([int(c.group(1)), COND_WORDS.index(c.group(2)), c.group(3)])
    return {"sel": int(m.group(2)), "agg": agg, "conds": conds}


def _cond_key(cond, with_column: bool = True, normalize=None):
    col, op, value = cond
    text = _value_text(value)
    key = (int(op), (normalize(text) if normalize else text).strip().lower())
    return (int(col),) + key if with_column else key


def lf_metrics(predictions: Sequence[str], rows: Sequence[dict], normalize=None) -> dict[str, float]:
    """Logical-form accuracies of predicted strings against the rows' ``sql``.

    * ``lf_exact``: WikiSQL logical-form accuracy (sel, agg and the set of conditions, values lowercased);
    * ``sel``, ``agg``: accuracy of each; ``conds``: the condition set (columns included);
    * ``lf_without_columns``: agg and the multiset of (operator, value) pairs, i.e. everything the question
      alone determines; ``parsed``: fraction of well-formed outputs.

    ``normalize`` (optional, ``str -> str``) is applied to gold and predicted values before comparing, e.g. a
    tokenizer round trip, so characters the tokenizer cannot write (Hebrew, Chinese, the Unicode minus sign
    in T5's case) do not count against the model.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"predictions ({len(predictions)}) and rows ({len(rows)}) differ in length")
    if not rows:
        raise ValueError("rows is empty")
    hits = Counter()
    for text, row in zip(predictions, rows):
        gold, pred = row["sql"], parse_logical_form(text)
        if pred is None:
            continue
        hits["parsed"] += 1
        sel, agg = pred["sel"] == gold["sel"], pred["agg"] == gold["agg"]
        key = lambda c, col=True: _cond_key(c, col, normalize)  # noqa: E731
        conds = Counter(key(c) for c in pred["conds"]) == Counter(key(c) for c in gold["conds"])
        loose = Counter(key(c, False) for c in pred["conds"]) == Counter(key(c, False) for c in gold["conds"])
        hits["sel"] += sel
        hits["agg"] += agg
        hits["conds"] += conds
        hits["lf_exact"] += sel and agg and conds
        hits["lf_without_columns"] += agg and loose
    n = len(rows)
    return {k: hits[k] / n for k in ("lf_exact", "sel", "agg", "conds", "lf_without_columns", "parsed")}


def majority_baseline(train_rows: Sequence[dict], eval_rows: Sequence[dict]) -> dict[str, float]:
    """Accuracy of always predicting the most frequent ``sel`` and ``agg`` of ``train_rows`` on ``eval_rows``."""
    sel = Counter(r["sql"]["sel"] for r in train_rows).most_common(1)[0][0]
    agg = Counter(r["sql"]["agg"] for r in train_rows).most_common(1)[0][0]
    n = len(eval_rows)
    return {"sel": sum(r["sql"]["sel"] == sel for r in eval_rows) / n,
            "agg": sum(r["sql"]["agg"] == agg for r in eval_rows) / n}
