"""Chapter 17's data: every milestone is well-formed and cited in the bibliography; model numbers are consistent."""
import re
from pathlib import Path

import pytest

from dldna.landscape import MILESTONES, MODEL_CARDS, Milestone, kv_cache_kib_per_token, plot_timeline

BIB = (Path(__file__).resolve().parent.parent / "book" / "references.bib").read_text()


def test_every_milestone_is_in_the_bibliography():
    eprints = set(re.findall(r"eprint = \{([\d.]+)\}", BIB))
    missing = [m.name for m in MILESTONES if m.arxiv not in eprints]
    assert not missing, f"add these papers to book/references.bib: {missing}"


def test_milestone_dates_agree_with_arxiv_ids():
    # new-style arXiv ids start with YYMM of the first submission
    for m in MILESTONES:
        assert m.arxiv[:4] == f"{m.year % 100:02d}{m.month:02d}", m


def test_milestone_validation():
    with pytest.raises(ValueError, match="category"):
        Milestone("x", 2020, 1, "quantum attention", "2001.00001", "")
    with pytest.raises(ValueError, match="arxiv"):
        Milestone("x", 2020, 1, "models", "not-an-id", "")


def test_model_cards_heads_and_kv_cache():
    for card in MODEL_CARDS:
        assert card.heads % card.kv_heads == 0
    by_name = {c.name: c for c in MODEL_CARDS}
    assert kv_cache_kib_per_token(by_name["Mistral 7B"]) == 128  # 2 * 32 layers * 8 heads * 128 * 2 bytes
    assert kv_cache_kib_per_token(by_name["Gemma 2B"]) == 18  # multi-query: 2 * 18 * 1 * 256 * 2 bytes


def test_timeline_plot_has_one_point_per_milestone():
    fig = plot_timeline()
    points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert points == len(MILESTONES)
