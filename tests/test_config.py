import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import REPO, imported_modules

from cdcd_composer.arguments import EXIT_STATUSES, train_config_keys, train_help
from cdcd_composer.commands.train import validate
from cdcd_composer.config import TrainConfig, load_config, parse_config
from cdcd_composer.preflight import default_precision


@pytest.mark.parametrize('name', ['cdcd-tiny', 'cdcd-char', 'cdcd-5m', 'cdcd-140m'])
def test_shipped_yamls_parse(name):
    cfg = parse_config(load_config(str(REPO / 'yamls' / f'{name}.yaml')))
    assert cfg.run_name == name


@pytest.mark.parametrize(
    'override, message',
    [
        ('model.d_modle=64', 'unknown key model.d_modle'),
        ('optimzer.lr=1', 'unknown key optimzer (free-form values go under `variables:`)'),
        ('model.n_layers=two', "model.n_layers='two' has the wrong type: expected int"),
        ('global_train_batch_size=1.5', 'global_train_batch_size=1.5 has the wrong type'),
        ('max_duration=10 steps', 'not a Composer time string'),
        ('model.n_heads=3', 'must split into model.n_heads=3 heads'),
        ('diffusion.t_mni=1', 'unknown key diffusion.t_mni'),
        ('eval_interval=soon', "eval_interval='soon' is not a Composer time string"),
    ],
)
def test_config_errors_name_the_key(tiny_config, override, message):
    raw = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), ['variables.data_root=x', override])
    with pytest.raises(ValueError) as exc:
        parse_config(raw)
    assert message in str(exc.value)
    assert '\n' not in str(exc.value)


@pytest.mark.parametrize('override, message', [
    # Out of range: silent garbage or a traceback before, one line naming the key now.
    ('model.n_heads=0', 'model.n_heads=0 must be positive'),
    ('compile_config.mode=bogus', "compile_config.mode='bogus' is not one of default, reduce-overhead"),
    ('compile_config.backend=bogus', "compile_config.backend='bogus' is not a torch.compile backend"),
    ('compile_config.fulgraph=true', 'compile_config.fulgraph is not a torch.compile option'),
    ('model.mlp_ratio=-1', 'model.mlp_ratio=-1.0 must be a positive finite number'),
    ('model.mlp_ratio=.nan', 'model.mlp_ratio=nan must be a positive finite number'),
    ('model.embed_init_std=-0.1', 'model.embed_init_std=-0.1 must be a positive finite number'),
    ('model.dropout=1.5', 'model.dropout=1.5 must lie in [0, 1)'),
    ('device_train_microbatch_size=0', 'device_train_microbatch_size=0 must be a positive integer'),
    ('device_train_microbatch_size=-2', 'device_train_microbatch_size=-2 must be a positive integer'),
    ('device_eval_batch_size=0', 'device_eval_batch_size=0 must be a positive integer'),
    ('max_duration=0ba', "max_duration='0ba' must be a positive duration"),
    ('eval_interval=0ba', "eval_interval='0ba' must be a positive duration"),
    ('save_interval=0ba', "save_interval='0ba' must be a positive duration"),
    ('optimizer.weight_decay=-1', 'optimizer.weight_decay=-1 must be a finite number >= 0'),
    ('optimizer.lr=0', 'optimizer.lr=0 must be a positive finite number'),
    ('optimizer.betas=[0.9]', 'optimizer.betas=[0.9] must be two numbers in [0, 1)'),
    ('optimizer.betas=[0.9,1.5]', 'optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)'),
    ('masking={prefix: .nan}', 'masking weights prefix/random/span must be >= 0'),
    ('dist_timeout=-5', 'dist_timeout=-5.0 must be a positive number of seconds'),
    ('data.num_canonical_nodes=0', 'data.num_canonical_nodes=0 must be a positive integer or null'),
    ('data.shuffle_algo=random', "data.shuffle_algo='random' must be one of py1e"),
    ('data.num_workers=-1', 'data.num_workers=-1 must be an integer >= 0'),
    ('device=tpu', "device='tpu' must be null or one of cpu, gpu, mps"),
    ('eval_subset_num_batches=-3', 'eval_subset_num_batches=-3 must be a positive integer, or -1'),
    ('save_num_checkpoints_to_keep=-2', 'save_num_checkpoints_to_keep=-2 must be an integer >= 0, or -1'),
    ('seed=-1', 'seed=-1 must be an integer in [0, 2^32 - 1]'),
    ('diffusion.t_max=0.5', 'diffusion.t_max=0.5 must be above diffusion.t_min=1.0'),
    ('diffusion.t_min=.inf', 'diffusion.t_min=inf must be a positive finite number'),
    ('save_folder=runs/{nope}', "save_folder='runs/{nope}' uses {nope}, which nothing fills in"),
    ('loggers.file.filename=runs/{run}.txt', 'uses {run}, which nothing fills in'),
    ('loggers.file.filename=/tmp', "loggers.file.filename='/tmp' is a directory"),
])  # fmt: skip
def test_out_of_range_values_fail_by_key_before_any_work(override, message):
    raw = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), ['variables.data_root=x', override])
    with pytest.raises(ValueError) as exc:
        parse_config(raw)
    assert message in str(exc.value) and '\n' not in str(exc.value), str(exc.value)


@pytest.mark.parametrize(
    'override, message',
    [
        ('optimizer.name=adam', "unknown optimizer 'adam'; valid names: adamw, decoupled_adamw"),
        ('optimizer.lrr=1.0', 'unknown key optimizer.fused_decoupled_adamw.lrr'),
        ('callbacks.speed_monitor.window=3', 'unknown key callbacks.speed_monitor.window'),
        ('algorithms.emma.half_life=1ba', "unknown algorithms 'emma'"),
        ('model.vocab_size=10', 'does not match the dataset vocabulary (512)'),
        ('data.seq_len=128', 'holds 96-token examples; set data.seq_len=96 or convert the data again'),
        ('precision=amp_bf16', 'precision=amp_bf16 needs a GPU; on CPU set precision=fp32'),
        ('device_train_microbatch_size=auto', 'device_train_microbatch_size=auto searches GPU memory'),
        ('device_train_microbatch_size=half', "device_train_microbatch_size='half' must be an integer"),
        ('global_train_batch_size=300', 'larger than the 256 training examples'),  # would hang
        ('optimizer.lr=fast', "optimizer.fused_decoupled_adamw.lr='fast' must be a finite number"),
        ('optimizer.lr=.nan', 'optimizer.fused_decoupled_adamw.lr=nan must be a finite number'),
        ('optimizer.betas=[0.9,x]', 'betas=[0.9, \'x\'] must be a list of finite numbers'),
        ('callbacks.time_warp_refit.mu=high', "time_warp_refit.mu='high' must be a finite number"),
        ('callbacks.lr_monitor=5', 'callbacks.lr_monitor=5 must be a mapping of keyword arguments'),
        ('callbacks.time_warp_refit.n_bin=8', 'unknown key callbacks.time_warp_refit.n_bin; valid keys'),
        ('callbacks.time_warp_refit.interval=0ba', "interval='0ba' must be a positive duration"),
        ('callbacks.training_samples.interval=0ba', "training_samples.interval='0ba' must be a positive"),
        ('scheduler.t_warmup=abc', "t_warmup='abc' is not a Composer time string"),
        ('algorithms.gradient_clipping.clipping_type=l3', "clipping_type='l3' must be one of adaptive, norm"),
        ('parallelism_config.fsdp.sharding=hybrid', 'unknown key parallelism_config.fsdp.sharding; valid'),
        ('parallelism_config.fsdp.data_parallel_shard_degree=2',
         'replicate degree None x shard degree 2 does not fit the world size 1'),
        ('parallelism_config.fsdp.data_parallel_replicate_degree=0',
         'data_parallel_replicate_degree=0 must be a positive integer or -1'),
        (['parallelism_config.fsdp.data_parallel_replicate_degree=-1',
          'parallelism_config.fsdp.data_parallel_shard_degree=-1'], 'cannot both be -1'),
        # What only a GPU would reach, checked all the same (device=gpu is not probed here):
        (['device=gpu', 'device_train_microbatch_size=auto', 'parallelism_config={fsdp: {}}'],
         'auto works with DDP or FSDP1 only in Composer 0.32.1; under FSDP2 set an integer'),
    ],
)  # fmt: skip
def test_registry_and_data_errors_before_any_work(tiny_config, override, message):
    raw = load_config(
        str(REPO / 'yamls' / 'cdcd-tiny.yaml'), override if isinstance(override, list) else [override]
    )
    raw['data']['root'] = tiny_config['data']['root']
    with pytest.raises(ValueError) as exc:
        validate(parse_config(raw))
    assert message in str(exc.value)


def test_missing_data_path_names_the_fix(tmp_path):
    raw = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), [f'variables.data_root={tmp_path}/nope'])
    with pytest.raises(ValueError, match=r"data.root .*nope' has no 'train' split; create it with"):
        validate(parse_config(raw))


@pytest.mark.slow
def test_cli_misspelt_key_fails_in_one_line_before_any_work(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / 'train.py'),
            str(REPO / 'yamls' / 'cdcd-tiny.yaml'),
            'model.d_modle=64',
            f'save_folder={tmp_path}/ckpt',
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2  # a usage or configuration error, as in every command
    assert proc.stderr.strip().splitlines() == [
        'config error: unknown key model.d_modle; valid keys: d_embed, d_model, d_time, dropout, '
        'embed_init_std, embedding_norm, mlp_ratio, n_fourier, n_heads, n_layers, preconditioning, '
        'target_time, tie_output_head, vocab_size'
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_autoresume_needs_a_fixed_run_name():
    raw = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), ['autoresume=true', 'run_name=null'])
    with pytest.raises(ValueError, match='autoresume=true needs a fixed run_name'):
        parse_config(raw)


def test_missing_yaml_is_a_clear_error():
    with pytest.raises(ValueError, match='not found'):
        load_config('yamls/nope.yaml')


def test_invalid_yaml_syntax_is_one_line_with_its_position(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model:\n  d_model: 64\n   n_layers: 2\n')
    with pytest.raises(ValueError, match=r'bad.yaml is not valid YAML at line 3, column \d+: '):
        load_config(str(bad))


def test_a_load_path_that_is_not_a_checkpoint_is_named(tiny_config, tmp_path):
    notes = tmp_path / 'notes.pt'
    notes.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='load_path .*notes.pt is not a PyTorch checkpoint: pass a .pt'):
        validate(parse_config(dict(tiny_config, load_path=str(notes))))


def test_false_switches_off_a_yaml_entry(tiny_config):
    from cdcd_composer.registry import enabled

    raw = load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), ['callbacks.time_warp_refit=false'])
    cfg = parse_config(raw)
    assert 'time_warp_refit' not in enabled(cfg.callbacks)
    assert enabled(cfg.callbacks)['lr_monitor'] == {}
    assert enabled({'a': None, 'b': True, 'c': {'x': 1}}) == {'a': {}, 'b': {}, 'c': {'x': 1}}


@pytest.mark.parametrize('text, message', [
    ('- a\n- b\n', 'holds a list; a config is a mapping of keys to values'),
    ('42\n', 'holds a single value; a config is a mapping of keys to values'),
])  # fmt: skip
def test_a_yaml_that_is_no_mapping_is_one_line(tmp_path, text, message):
    path = tmp_path / 'x.yaml'
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))


def test_an_override_of_another_shape_names_the_key():
    with pytest.raises(ValueError) as exc:
        load_config(str(REPO / 'yamls' / 'cdcd-tiny.yaml'), ['loggers.file=[a,b]'])
    assert "override 'loggers.file=[a,b]': loggers.file is a mapping in the YAML" in str(exc.value)
    assert '\n' not in str(exc.value)


@pytest.mark.parametrize('device, precision', [('cpu', 'fp32'), ('gpu', 'amp_bf16'), ('mps', 'fp32')])
def test_precision_null_follows_the_device_the_run_trains_on(device, precision):
    """`precision: null` is bf16 autocast on a GPU and fp32 elsewhere, even where a GPU is present."""
    assert default_precision(device) == precision
    assert default_precision(None) == ('amp_bf16' if torch.cuda.is_available() else 'fp32')


@pytest.mark.slow  # spawns interpreters
@pytest.mark.parametrize(
    'script', ['train.py', 'data_prep/convert_tinystories.py', 'generate.py', 'eval.py', 'export.py']
)
def test_help_lists_the_options_without_importing_torch(script):
    cmd = [sys.executable, '-X', 'importtime', str(REPO / script), '-h']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'usage:' in proc.stdout
    assert ('top-level keys:' if script == 'train.py' else '--') in proc.stdout
    assert EXIT_STATUSES in proc.stdout  # one convention: 0, 1 failed while working, 2 usage, 130
    assert not {'torch', 'composer', 'streaming', 'transformers'} & imported_modules(proc.stderr)


def test_train_help_names_every_top_level_key():
    assert train_config_keys() == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(key in train_help() for key in train_config_keys())
