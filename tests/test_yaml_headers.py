"""Every figure a shipped YAML's comments state is computed here from the YAML itself.

Sizes come from `bench/sizes.py`, token counts from the YAML's own duration and batch. Quality
figures (percentages) take training runs no test can afford, so they live in docs/ablations.md
next to the command that produced them, and a YAML comment must not state one.
"""

from __future__ import annotations

import re
import sys

import pytest
from conftest import REPO
from shipped import SHIPPED, shipped_yaml

sys.path.insert(0, str(REPO / 'bench'))
from sizes import sizes  # noqa: E402

SIZE = re.compile(
    r'([\d.]+)M parameters, ([\d.]+)M non-embedding, ([\d.]+)M output head; '
    r'forward ([\d.]+) MFLOPs/token at (\d+) tokens; vocabulary (\d+)'
)
TOKENS = re.compile(r'^max_duration: (\d+)ba\s+# (\d+) x (\d+) x (\d+) = ~([\d.]+)([MB]) tokens', re.M)


def comments(name: str) -> str:
    """The YAML's comments, joined into one line (a figure may wrap)."""
    text = (REPO / 'yamls' / f'{name}.yaml').read_text()
    return ' '.join(part.split('#', 1)[1].strip() for part in text.splitlines() if '#' in part)


@pytest.mark.parametrize('name', SHIPPED)
def test_the_stated_size_is_the_models(name):
    stated = SIZE.search(comments(name))
    assert stated, f'{name}.yaml states no size line'
    total, non_embedding, head, mflops, seq_len, vocab = stated.groups()
    model = dict(shipped_yaml(name)['model'], vocab_size=int(vocab))
    actual = sizes(model, int(seq_len))
    assert f'{actual["total"] / 1e6:.2f}' == total
    assert f'{actual["non_embedding"] / 1e6:.2f}' == non_embedding
    assert f'{actual["head"] / 1e6:.2f}' == head
    assert f'{actual["flops_per_token"] / 1e6:.3g}' == mflops


@pytest.mark.parametrize('name', SHIPPED)
def test_the_stated_token_count_is_duration_times_batch_times_canvas(name):
    cfg = shipped_yaml(name)
    text = (REPO / 'yamls' / f'{name}.yaml').read_text()
    stated = TOKENS.search(text)
    assert stated, f'{name}.yaml states no token count beside max_duration'
    batches, factor_batches, batch, canvas, amount, unit = stated.groups()
    assert int(batches) == int(factor_batches) == int(cfg['max_duration'].removesuffix('ba'))
    assert int(batch) == cfg['global_train_batch_size']
    canvas_stated = SIZE.search(comments(name)).group(5)
    assert canvas == canvas_stated  # the canvas of the size line
    total = int(batches) * int(batch) * int(canvas) / {'M': 1e6, 'B': 1e9}[unit]
    assert f'{total:.{len(amount.split(".")[1]) if "." in amount else 0}f}' == amount


@pytest.mark.parametrize('name', SHIPPED)
def test_no_quality_figure_is_stated_without_its_command(name):
    assert '%' not in comments(name), f'{name}.yaml states a quality figure: move it to docs/ablations.md'
