"""Exact resume: a run interrupted mid-epoch and resumed ends bit-for-bit where an uninterrupted
run ends (per-batch losses after the resume point, weights, optimizer state, time-warp curve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from conftest import REPO, kill_when_paused, tiny_overrides
from s3_server import free_port
from safetensors.torch import load_file

from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit
from cdcd_composer.commands import train
from cdcd_composer.config import parse_config

pytestmark = pytest.mark.slow

MASKING = {'prefix': 0.5, 'random': 0.3, 'span': 0.2, 'drop': 0.1}
REFIT = {
    'interval': '2ba',
    'buffer_size': 64,
    'n_bins': 8,
    'min_points': 16,
    'min_evidence': 0.0,
    'min_group_points': 1,
}


class Preempted(Exception):
    pass


class Recorder(Callback):
    """Per-batch training loss; optionally dies when batch `crash_at` starts."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.losses: dict[int, torch.Tensor] = {}
        self.crash_at = crash_at

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.crash_at:
            raise Preempted

    def batch_end(self, state, logger) -> None:
        self.losses[int(state.timestamp.batch)] = state.loss.detach().clone()


def resumable_config(tiny_config: dict, folder: Path, name: str) -> dict:
    """cdcd-tiny with masks, self-conditioning, refits, EMA, an eval and checkpoints every 4 batches."""
    cfg = dict(
        tiny_config, run_name=name, autoresume=True, save_folder=str(folder / 'ckpt'), save_interval='4ba',
        save_num_checkpoints_to_keep=-1, max_duration='10ba', eval_interval='5ba', masking=MASKING,
    )  # fmt: skip
    cfg['algorithms'] = dict(cfg['algorithms'], ema={'half_life': '3ba'})
    cfg['callbacks'] = dict(cfg['callbacks'], time_warp_refit=dict(REFIT, plot_folder=str(folder)))
    cfg['callbacks']['export_weights'] = {'folder': str(folder / 'export')}
    return cfg


def fit(cfg: dict, recorder: Recorder):
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    return trainer


def test_interrupted_mid_epoch_run_resumes_bit_for_bit(tiny_config, tmp_path):
    straight = Recorder()
    a = fit(resumable_config(tiny_config, tmp_path / 'a', 'straight'), straight)

    cfg = resumable_config(tiny_config, tmp_path / 'b', 'interrupted')
    with pytest.raises(Preempted):
        fit(cfg, Recorder(crash_at=6))  # Batches 5 and 6 are lost; the checkpoint at 4 survives.
    resumed = Recorder()
    b = fit(cfg, resumed)  # The same config again: autoresume picks up batch 4 (mid-epoch: 32/epoch).

    assert sorted(resumed.losses) == list(range(5, 11))
    for batch, loss in resumed.losses.items():
        assert torch.equal(loss, straight.losses[batch]), batch
    weights_a, weights_b = a.state.model.state_dict(), b.state.model.state_dict()
    assert weights_a.pop('_extra_state') == weights_b.pop('_extra_state')  # the run spec
    ema_a, ema_b = weights_a.pop('ema'), weights_b.pop('ema')  # the averaged weights
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[k], weights_a[k]) for k in ema_a)  # they are not the weights
    opt_a, opt_b = a.state.optimizers[0].state_dict()['state'], b.state.optimizers[0].state_dict()['state']
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    warp_a, warp_b = (next(c for c in t.state.callbacks if isinstance(c, TimeWarpRefit)) for t in (a, b))
    assert warp_a.fit_count == warp_b.fit_count > 0
    for key, value in warp_a.warp.state_dict().items():
        assert torch.equal(value, warp_b.warp.state_dict()[key]), key


def s3_run_command(
    driver_args: list[str], tiny_dataset: Path, folder: Path, bucket: str | None, name: str
) -> list[str]:
    """The training command of the kill-and-resume tests (identical for every attempt).

    `bucket=None` saves to `folder/checkpoints` instead: the uninterrupted reference run, whose
    numbers do not depend on where its checkpoints go (and which skips the upload workers' start).
    """
    save_folder = f's3://{bucket}/runs/{{run_name}}/checkpoints' if bucket else f'{folder}/checkpoints'
    overrides = [
        *tiny_overrides(tiny_dataset, folder),
        f'run_name={name}', 'autoresume=true', f'save_folder={save_folder}',
        'save_interval=5ba', 'save_num_checkpoints_to_keep=-1', 'max_duration=20ba', 'eval_interval=10ba',
        'algorithms.ema.half_life=3ba',  # the exports compared below hold the averaged weights
        *[f'masking.{k}={v}' for k, v in MASKING.items()],
        *[f'callbacks.time_warp_refit.{k}={v}' for k, v in REFIT.items()],
    ]  # fmt: skip
    return [*driver_args, str(REPO / 'yamls' / 'cdcd-tiny.yaml'), *overrides]


def read_losses(path: Path) -> list[tuple[int, str]]:
    return [(int(b), x) for b, x in (line.split() for line in path.read_text().splitlines())]


def s3_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL'])
    return [o['Key'] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get('Contents', [])]


@pytest.mark.parametrize('strategy', ['single', 'fsdp2'])
def test_sigkill_and_the_same_command_resume_exactly_from_s3(strategy, tiny_dataset, tmp_path, s3_env):
    bucket = s3_env()
    driver = str(REPO / 'tests' / 'loss_recording_driver.py')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if strategy == 'single':
        launcher = [sys.executable, driver]
    else:
        env['FSDP_VERSION'] = '2'
        composer = str(Path(sys.executable).parent / 'composer')
        launcher = [composer, '-n', '2', '--stderr', str(tmp_path / 'err{rank}.txt'), driver]

    def command(name: str) -> list[str]:
        losses = str(tmp_path / f'{name}-{{rank}}.txt')
        store = None if name == 'straight' else bucket  # the reference saves locally
        cmd = s3_run_command([*launcher, losses], tiny_dataset, tmp_path / name, store, name)
        if strategy == 'fsdp2':
            cmd += ['parallelism_config.fsdp.state_dict_type=sharded', 'global_train_batch_size=16']
        return cmd

    def run(name: str) -> None:
        proc = subprocess.run(command(name), env=env, capture_output=True, text=True, cwd=tmp_path)
        ranks = ''.join(p.read_text()[-1500:] for p in tmp_path.glob('err*.txt'))
        assert proc.returncode == 0, proc.stderr[-1500:] + ranks

    run('straight')
    ranks = (0,) if strategy == 'single' else (0, 1)
    # Killed after batch 11, once the pointer to the checkpoint of batch 10 is in the bucket.
    pause = dict(
        env, PAUSE_AT_BATCH='11', PAUSE_POINTER_NAMES='ba10', PAUSE_MARKER=str(tmp_path / 'paused-{rank}'),
        PAUSE_POINTER=f's3://{bucket}/runs/killed/checkpoints/latest-rank0.pt.symlink',
    )  # fmt: skip
    kill_when_paused(command('killed'), [tmp_path / f'paused-{r}' for r in ranks], pause, cwd=tmp_path)
    before = {r: read_losses(tmp_path / f'killed-{r}.txt') for r in ranks}
    assert all([b for b, _ in before[r]] == list(range(1, 12)) for r in ranks)
    run('killed')  # The same command again.

    for rank in ranks:
        straight = dict(read_losses(tmp_path / f'straight-{rank}.txt'))
        after = read_losses(tmp_path / f'killed-{rank}.txt')[len(before[rank]) :]
        assert [b for b, _ in after] == list(range(11, 21))  # resumed from the checkpoint of batch 10
        assert all(loss == straight[b] for b, loss in after), rank  # Bit-for-bit (hex floats).
    exports = [
        load_file(str(tmp_path / name / 'export' / 'model.safetensors')) for name in ('straight', 'killed')
    ]
    assert exports[0].keys() == exports[1].keys()
    assert all(torch.equal(exports[0][k], exports[1][k]) for k in exports[0])  # Weights and warp curve.
    spec = json.loads(json.loads((tmp_path / 'killed' / 'export' / 'cdcd_config.json').read_text())['spec'])
    assert spec['weights'] == 'ema'  # The averages, resumed bit for bit.
    if strategy == 'single':
        final = 'ep0-ba20-rank0.pt'
        ckpts = [
            torch.load(tmp_path / 'straight' / 'checkpoints' / final, weights_only=False),
            get_checkpoint(bucket, 'killed', tmp_path),
        ]
        opt_a, opt_b = (_flatten(c['state']['optimizers']) for c in ckpts)
        assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
        refit = [c['state']['callbacks']['TimeWarpRefit'] for c in ckpts]
        assert refit[0]['fit_count'] == refit[1]['fit_count']
        assert torch.equal(refit[0]['buffer'].nan_to_num(-7.0), refit[1]['buffer'].nan_to_num(-7.0))


def get_checkpoint(bucket: str, name: str, tmp_path: Path) -> dict:
    from composer.utils import get_file

    local = tmp_path / f'{name}-final.pt'
    get_file(f's3://{bucket}/runs/{name}/checkpoints/ep0-ba20-rank0.pt', str(local))
    return torch.load(local, weights_only=False)


def _flatten(tree, prefix: str = '') -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}/{key}').items()}
    return {}


def test_damaged_or_unpointed_checkpoints_stop_with_a_way_out(tiny_config, tmp_path):
    cfg = dict(resumable_config(tiny_config, tmp_path, 'damaged'), max_duration='8ba', eval_interval='8ba')
    train.main(cfg)
    folder = tmp_path / 'ckpt'
    good, latest = folder / 'ep0-ba4-rank0.pt', folder / 'ep0-ba8-rank0.pt'
    good_bytes = good.read_bytes()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # A truncated upload.
    longer = dict(cfg, max_duration='12ba')
    with pytest.raises(
        ValueError, match=rf'damaged: delete it .* or set load_path={folder}/ep0-ba4-rank0.pt'
    ):
        train.main(longer)
    assert good.read_bytes() == good_bytes


def test_checkpoints_without_their_pointer_resume_from_the_newest_complete_one(tiny_config, tmp_path):
    straight = Recorder()
    fit(dict(resumable_config(tiny_config, tmp_path / 'a', 'straight'), max_duration='12ba'), straight)
    cfg = dict(resumable_config(tiny_config, tmp_path / 'b', 'unpointed'), max_duration='12ba')
    with pytest.raises(Preempted):
        fit(cfg, Recorder(crash_at=9))
    folder = tmp_path / 'b' / 'ckpt'
    # Killed while the checkpoint of batch 8 was being written, before its pointer: no pointer at
    # all, and the newest checkpoint cut short.
    (folder / 'latest-rank0.pt').unlink()
    latest = folder / 'ep0-ba8-rank0.pt'
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    resumed = Recorder()
    fit(cfg, resumed)  # The same command resumes:
    assert sorted(resumed.losses) == list(range(5, 13))  # from batch 4, the newest complete one,
    assert all(torch.equal(loss, straight.losses[b]) for b, loss in resumed.losses.items())  # exactly.
    for checkpoint in folder.glob('ep*-rank0.pt'):  # batches 4, 8 and 12
        checkpoint.write_bytes(b'')
    (folder / 'latest-rank0.pt').unlink()
    with pytest.raises(ValueError, match='holds checkpoints .* but none is complete'):
        train.validate(parse_config(cfg))


def start_proxy(port: int, target: int, control: Path) -> subprocess.Popen:
    """The TCP proxy of `tcp_proxy.py`, once it listens (its `listening` file says so)."""
    control.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / 'tests' / 'tcp_proxy.py'), str(port), str(target), str(control)]
    )
    wait_for(lambda: (control / 'listening').exists(), proc, 'the TCP proxy to listen')
    return proc


def wait_for(condition, process: subprocess.Popen, what: str, limit: float = 600.0) -> None:
    """Polls `condition` until it holds; fails naming `what` if `process` ends first (or after `limit` s)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, (
            f'ended while waiting for {what}: {process.stderr and process.stderr.read()}'
        )
        assert time.monotonic() < deadline, f'gave up waiting for {what}'
        time.sleep(0.05)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_checkpoint_uploads_survive_an_outage(tiny_dataset, tmp_path, s3_endpoint, s3_env):
    """The store goes away while checkpoints come due and comes back only once the run has met it.

    The outage ends on events, not after a time: the run has trained past a checkpoint that came
    due during it (batch 10), and its uploads have been dropped at least 3 times (so retried).
    """
    bucket = s3_env()
    port, target, control = free_port(), int(s3_endpoint.rsplit(':', 1)[1]), tmp_path / 'proxy'
    proxy = start_proxy(port, target, control)
    losses = tmp_path / 'outage-0.txt'
    driver = [
        sys.executable,
        str(REPO / 'tests' / 'loss_recording_driver.py'),
        str(losses).replace('-0', '-{rank}'),
    ]
    cmd = s3_run_command(driver, tiny_dataset, tmp_path / 'outage', bucket, 'outage')
    env = dict(
        os.environ, OMP_NUM_THREADS='1', S3_ENDPOINT_URL=f'http://127.0.0.1:{port}', BATCH_SLEEP_SECONDS='0.5'
    )
    run = subprocess.Popen(  # in tmp_path: Composer downloads under ./s3:/
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        wait_for(lambda: lines(losses) >= 4, run, 'batch 4')
        (control / 'down').touch()  # The store goes away while the checkpoints of batches 5, 10, ... are due.
        wait_for(
            lambda: lines(losses) >= 11 and lines(control / 'dropped') >= 3, run, 'uploads to meet the outage'
        )
        (control / 'down').unlink()
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
    finally:
        run.kill()
        proxy.kill()
    keys = {k.rsplit('/', 1)[-1] for k in s3_keys(bucket, 'runs/outage/checkpoints/')}
    assert {f'ep0-ba{b}-rank0.pt' for b in range(5, 21, 5)} | {'latest-rank0.pt.symlink'} <= keys
    checkpoint = get_checkpoint(bucket, 'outage', tmp_path)
    assert checkpoint['state']['timestamp']['Timestamp']['batch'] == 20


def test_unreachable_bucket_is_named_before_training(tiny_config, tmp_path, s3_env):
    from cdcd_composer.config import parse_config

    cfg = dict(tiny_config, save_folder='s3://no-such-bucket/runs/{run_name}/checkpoints')
    with pytest.raises(
        ValueError, match='cannot reach s3://no-such-bucket/runs/cdcd-tiny/checkpoints: NoSuchBucket'
    ):
        train.validate(parse_config(cfg))


def test_an_unpointed_run_in_a_bucket_resumes_from_its_newest_complete_checkpoint(
    tiny_config, s3_env, tmp_path
):
    import boto3

    bucket = s3_env()
    s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL'])
    torch.save({'state': {}}, tmp_path / 'whole.pt')
    whole = (tmp_path / 'whole.pt').read_bytes()
    # Killed while ep0-ba8 was uploading (a part of it is there) and before any pointer reached the bucket.
    for name, data in (('ep0-ba4-rank0.pt', whole), ('ep0-ba8-rank0.pt', whole[: len(whole) // 2])):
        s3.put_object(Bucket=bucket, Key=f'runs/cut/checkpoints/{name}', Body=data)
    cfg = parse_config(dict(tiny_config, run_name='cut', autoresume=True,
                            save_folder=f's3://{bucket}/runs/{{run_name}}/checkpoints'))  # fmt: skip
    resolved = train.resolve_autoresume(cfg)
    assert resolved.load_path == f's3://{bucket}/runs/cut/checkpoints/ep0-ba4-rank0.pt'
    assert cfg.load_path is None  # a resolved copy: the config passed in is left as it was


@pytest.mark.slow
def test_every_resume_from_a_bucket_reads_its_newest_checkpoint(tiny_config, s3_env, tmp_path, monkeypatch):
    """Composer downloads the resumed checkpoint under ./s3:/ and would reuse that copy on the next
    resume from the same directory (`workarounds.autoresume_downloads_the_newest`)."""
    bucket = s3_env()
    monkeypatch.chdir(tmp_path)  # where Composer puts its download
    unneeded = ('training_samples', 'export_weights')
    callbacks = {k: v for k, v in tiny_config['callbacks'].items() if k not in unneeded}
    cfg = dict(tiny_config, run_name='twice', autoresume=True, save_interval='2ba', eval_interval='100ba',
               callbacks=callbacks, save_folder=f's3://{bucket}/runs/{{run_name}}/checkpoints')  # fmt: skip
    train.main(dict(cfg, max_duration='2ba'))
    for start in (2, 4):  # two resumes, each from the checkpoint the previous run ended with
        trainer = train.main(dict(cfg, max_duration=f'{start + 2}ba'), return_trainer=True, do_train=False)
        assert int(trainer.state.timestamp.batch) == start
        trainer.fit()
        trainer.close()


@pytest.mark.parametrize('change, message', [
    ({'seq_len': 64}, r'another seq_len \(96 tokens, not 64\)'),
    ({'train_tokenizer': 400}, 'another tokenizer'),
])  # fmt: skip
def test_resuming_on_data_converted_again_differently_is_refused(tiny_config, tmp_path, change, message):
    """The same command after the data was converted again with another tokenizer or canvas must not
    train the checkpoint on token ids it never saw (a tokenizer trained again is another tokenizer)."""
    from cdcd_composer.data.conversion import convert

    cfg = dict(tiny_config, autoresume=True, save_interval='2ba', max_duration='2ba')
    train.main(cfg)
    again = tmp_path / 'again'
    settings = dict(source='synthetic', seq_len=96, num_train=256, num_val=64, train_tokenizer=512)
    convert(out_root=str(again), **(settings | change))
    longer = dict(cfg, max_duration='4ba', data=dict(cfg['data'], root=str(again)))
    with pytest.raises(ValueError, match=f'trained on data with {message} than data.root has now'):
        train.main(longer)
    resumed = train.main(dict(cfg, max_duration='4ba'), return_trainer=True)  # on its own data: resumes
    assert int(resumed.state.timestamp.batch) == 4


@pytest.mark.parametrize('stop, code, said', [
    (KeyboardInterrupt, 130, 'interrupted at batch 3'),  # what Python raises in the main thread on SIGINT
    (lambda: OSError(28, 'No space left on device', '/data/run/x'), 1,
     'error: /data/run/x: No space left on device; stopped at batch 3'),
])  # fmt: skip
def test_ctrl_c_or_a_full_disk_says_where_the_run_stands_and_the_same_command_resumes(
    stop, code, said, tiny_config, tmp_path, capsys
):
    class Stop(Callback):
        def batch_end(self, state, logger) -> None:
            if int(state.timestamp.batch) == 3:
                raise stop()

    cfg = dict(tiny_config, autoresume=True, save_interval='2ba', max_duration='4ba')
    parsed = parse_config(cfg)
    trainer = train.main(cfg, return_trainer=True, do_train=False)
    trainer.state.callbacks.append(Stop())
    with pytest.raises(SystemExit) as exit_:
        train.fit_or_say_where_it_stopped(trainer, parsed)
    assert exit_.value.code == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    newest = tmp_path / 'checkpoints' / 'ep0-ba2-rank0.pt'
    assert err == f'{said}; the newest checkpoint is {newest}: the same command resumes from it'
    trainer.close()
    resumed = train.main(cfg, return_trainer=True)
    assert int(resumed.state.timestamp.batch) == 4
