"""Options users of earlier reproductions expect: preconditioning variants, the auxiliary MSE loss,
LayerNorm embeddings, a byte tokenizer with a char config, and the asymmetric time shift."""

import json
import random

import pytest
import torch
from conftest import REPO, TINY_MODEL

from cdcd_composer.commands import generate, train
from cdcd_composer.composer_model import CDCDComposerModel
from cdcd_composer.config import load_config
from cdcd_composer.data.conversion import convert
from cdcd_composer.data.tokenization import byte_tokenizer, load_tokenizer
from cdcd_composer.model import CDCDConfig, CDCDTransformer, skip_and_out, vocabulary_cross_entropy
from cdcd_composer.sampler import SamplerSettings, sample

VOCAB = 50


def wrapper(**model: object) -> CDCDComposerModel:
    return CDCDComposerModel({'vocab_size': VOCAB, **TINY_MODEL, **model}, t_max=20.0)


def corrupted(model: CDCDComposerModel) -> dict[str, torch.Tensor]:
    return model.corrupt({'tokens': torch.randint(0, VOCAB, (3, 10))})


@pytest.mark.parametrize('preconditioning', ['cdcd', 'edm', 'tanh'])
def test_preconditioning_forms_x0_hat_from_the_expected_embedding(preconditioning):
    model = wrapper(preconditioning=preconditioning).model
    batch = corrupted(wrapper())
    x_t = model.embed(batch['tokens']) + batch['t'][:, None, None] * batch['noise']
    logits, x0_hat, *_ = model(batch['tokens'], batch['t'], batch['generate_mask'], batch['self_cond'],
                              noise=batch['noise'], expected_embedding=True)  # fmt: skip
    expected = model.expected_embedding(logits)
    t = batch['t'][:, None, None]
    manual = {
        'cdcd': expected,
        'edm': x_t / (t**2 + 1) + t / (t**2 + 1).sqrt() * expected,
        'tanh': (1 - t.tanh()) * x_t + t.tanh() * expected,
    }[preconditioning]
    torch.testing.assert_close(x0_hat, manual)


def test_edm_coefficients_are_a_unit_variance_interpolation():
    """EDM, sigma_data = 1: c_skip + c_out^2 = 1, c_skip(0.5) = 0.8, c_out -> 1 at high t; cdcd: (0, 1)."""
    t = torch.tensor([0.5, 1.0, 10.0, 300.0])
    c_skip, c_out = skip_and_out('edm', t)
    torch.testing.assert_close(c_skip + c_out**2, torch.ones(4))
    assert c_out[-1] > 0.99999 and c_skip[0] == 0.8
    c_skip, c_out = skip_and_out('cdcd', t)
    assert torch.equal(c_skip, torch.zeros(4)) and torch.equal(c_out, torch.ones(4))


def test_mse_weight_zero_is_exactly_the_cross_entropy_and_positive_adds_the_term():
    torch.manual_seed(0)
    plain = wrapper()
    batch = corrupted(plain)
    out = plain(batch)
    ce = plain.denoise(batch, cross_entropy=True).cross_entropy  # the loss's own CE, recomputed
    ce = (ce.sum(-1) / ce.shape[-1]).mean()  # each sequence's mean, averaged over sequences
    assert torch.equal(out['loss'], ce) and 'mse' not in out  # every position generated here
    # ... and that CE is the cross-entropy of the vocabulary-sized logits.
    torch.testing.assert_close(ce, vocabulary_cross_entropy(out['logits'], batch['tokens']).mean())
    weighted = CDCDComposerModel({'vocab_size': VOCAB, **TINY_MODEL}, t_max=20.0, mse_weight=0.5)
    weighted.load_state_dict(plain.state_dict())
    out_w = weighted(batch)
    x0_hat = weighted.denoise(batch, expected_embedding=True).x0_hat
    mse = (x0_hat - weighted.model.embed(batch['tokens'])).square().mean()
    torch.testing.assert_close(out_w['mse'], mse)
    torch.testing.assert_close(out_w['loss'], ce + 0.5 * mse)
    out_w['loss'].backward()  # the term reaches the embedding table through x0_hat and e
    assert weighted.model.embedding.weight.grad.abs().sum() > 0


def test_layernorm_embeddings_are_normalised_by_a_learned_layernorm():
    model = wrapper(embedding_norm='layernorm').model
    rows = model.embedding_matrix()
    torch.testing.assert_close(rows.mean(-1), torch.zeros(VOCAB), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.var(-1, unbiased=False), torch.ones(VOCAB), atol=1e-3, rtol=0)
    with torch.no_grad():
        model.embedding_norm.weight.fill_(2.0)  # the gain is a parameter, unlike the L2 scale
    torch.testing.assert_close(model.embedding_matrix().var(-1, unbiased=False), torch.full((VOCAB,), 4.0),
                               atol=4e-3, rtol=0)  # fmt: skip


@pytest.mark.parametrize('override, message', [
    ('model.preconditioning=karras', "model.preconditioning='karras' is not one of cdcd, edm, tanh"),
    ('model.embedding_norm=rms', "model.embedding_norm='rms' is not one of l2, layernorm"),
    ('loss.mse_weight=-1', 'loss.mse_weight=-1 must be >= 0'),
    ('loss.mse_wieght=1', 'unknown key loss.mse_wieght'),
])  # fmt: skip
def test_bad_option_values_are_named(tiny_config, override, message):
    cfg = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), [override])
    cfg['data']['root'] = tiny_config['data']['root']
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        train.main(cfg, do_train=False)


def random_text(rng: random.Random, n: int) -> str:
    """Any Unicode scalar value (no surrogates): ASCII, accents, CJK, emoji, combining marks, controls."""
    pools = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
             (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]  # fmt: skip
    return ''.join(chr(rng.randint(*rng.choice(pools))) for _ in range(n))


def test_byte_tokenizer_round_trips_arbitrary_utf8_exactly(tmp_path):
    tokenizer = byte_tokenizer()
    assert len(tokenizer) == 261
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 200)) for _ in range(200)] + ['', ' ', '  a  b  ', 'Café\r\n']
    saved = tmp_path / 'tok'
    tokenizer.save_pretrained(saved)
    reloaded = load_tokenizer(str(saved))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)['input_ids']
        assert ids == [5 + b for b in text.encode('utf-8')]  # one token per byte
        assert tokenizer.decode(ids) == text
        assert reloaded(text, add_special_tokens=False)['input_ids'] == ids
    framed = tokenizer('hi')['input_ids']
    assert framed == [tokenizer.cls_token_id, 5 + ord('h'), 5 + ord('i'), tokenizer.sep_token_id]


class RecordTimes(torch.nn.Module):
    """Wraps a denoiser and records the t it is evaluated at."""

    def __init__(self, model: CDCDTransformer) -> None:
        super().__init__()
        self.model, self.config, self.times = model, model.config, []

    def forward(self, tokens, t, *args, **kwargs):
        self.times.append(float(t[0]))
        return self.model(tokens, t, *args, **kwargs)


def test_eval_time_evaluates_at_a_scaled_time_or_at_the_next_time_plus_delta():
    model = RecordTimes(CDCDTransformer(CDCDConfig(vocab_size=VOCAB, **TINY_MODEL)).eval())
    steps = torch.tensor([20.0, 10.0, 4.0, 1.0])
    sample(model, steps, 2, 8, SamplerSettings(solver='euler'), generator=torch.Generator().manual_seed(0))
    assert model.times == [20.0, 10.0, 4.0, 1.0]  # t_i, then the final pass at t_min
    model.times.clear()
    scaled = SamplerSettings(eval_time='1.15')
    sample(model, steps, 2, 8, scaled, generator=torch.Generator().manual_seed(0))
    assert model.times == pytest.approx([23.0, 11.5, 4.6, 1.0])  # 1.15 t_i; the argmax pass at t_min
    model.times.clear()
    shifted = sample(
        model,
        steps,
        2,
        8,
        SamplerSettings(solver='euler', eval_time='next+0.5'),
        generator=torch.Generator().manual_seed(0),
    )
    assert model.times == [10.5, 4.5, 1.5, 1.0]
    assert shifted.shape == (2, 8)
    with pytest.raises(ValueError, match='Euler steps only'):
        SamplerSettings(solver='heun', eval_time='next+0.5')


@pytest.mark.slow
def test_bytes_end_to_end_convert_train_generate(tmp_path):
    root = tmp_path / 'char'
    meta = convert(
        source='synthetic', out_root=str(root), tokenizer='bytes', seq_len=512, num_train=64, num_val=16
    )
    assert meta.vocab_size == 261 and meta.tokenizer == 'bytes'
    overrides = [
        f'variables.data_root={root}', 'max_duration=2ba', 'global_train_batch_size=4', 'eval_interval=2ba',
        'eval_subset_num_batches=1', 'progress_bar=false', 'save_folder=null',
        f'loggers.file.filename={tmp_path}/l.txt', f'callbacks.time_warp_refit.plot_folder={tmp_path}',
        f'callbacks.export_weights.folder={tmp_path}/export',
        'callbacks.training_samples.steps=2', 'model.preconditioning=edm', 'model.embedding_norm=layernorm',
        'loss.mse_weight=0.1', *[f'model.{k}={v}' for k, v in TINY_MODEL.items()],
    ]  # fmt: skip
    train.main(load_config(str(REPO / 'yamls' / 'cdcd-char.yaml'), overrides))
    out = tmp_path / 'samples.jsonl'
    args = [
        '--num_samples',
        '2',
        '--steps',
        '3',
        '--solver',
        'euler',
        '--eval_time',
        'next+0.5',
        '--prompt',
        'Once upon a time',
    ]
    assert generate.main([str(tmp_path / 'export'), *args, '--out', str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r['text'].startswith('Once upon a time') for r in rows)
