"""The same run on any number of ranks: 1 process and 2 ranks train the same weights, and a
checkpoint written on 2 ranks resumes on 1 (and one written on 1 on 2) on the uninterrupted run's
trajectory. Streaming gives the same global sample order on any world size (canonical nodes and
shuffle seed fixed in the YAML); every training draw belongs to its sample (`sample_draws`); the
loss is a mean over the global batch however it is split. What still changes with the world size
is floating-point summation order, so weights agree within a relative 1e-4, not bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow

DRIVER = """
import hashlib, os, sys, torch
from cdcd_composer.commands import train
from composer.core import Callback
from composer.utils import dist
from cdcd_composer.config import load_config
from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit

class RecordOrder(Callback):
    '''Per global batch, the hashes of its samples in rank order (saved by rank 0).'''

    def __init__(self):
        self.batches = {{}}

    def batch_start(self, state, logger):
        mine = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:12] for row in state.batch['tokens'].cpu()]
        everyone = dist.all_gather_object(mine)
        self.batches[int(state.timestamp.batch) + 1] = [h for rank in everyone for h in rank]

    def fit_start(self, state, logger):
        self.loaded, self.loaded_ema = whole_weights(state.model)  # as loaded

    def batch_checkpoint(self, state, logger):
        '''The weights of batch 4's checkpoint (the one resumed from). STOP_AT=N: the run ends after
        batch N's checkpoint, as a preempted job does (its schedule stays the whole run's, which
        Trainer.fit(duration=...) would shorten).'''
        if int(state.timestamp.batch) == 4:
            self.checkpointed = whole_weights(state.model)
        if int(state.timestamp.batch) == int(os.environ.get('STOP_AT', -1)):
            self.fit_end(state, logger)
            dist.barrier()
            os._exit(0)

    def fit_end(self, state, logger):
        refit = next(c for c in state.callbacks if isinstance(c, TimeWarpRefit))
        final, final_ema = whole_weights(state.model)
        if dist.get_global_rank() == 0:
            masses = getattr(state.model, 'module', state.model).time_warp.masses.clone()
            checkpointed, checkpointed_ema = getattr(self, 'checkpointed', (None, None))
            torch.save({{'batches': self.batches, 'n_seen': refit.n_seen, 'fit_count': refit.fit_count,
                        'masses': masses, 'loaded': self.loaded, 'loaded_ema': self.loaded_ema,
                        'final': final, 'final_ema': final_ema, 'checkpointed': checkpointed,
                        'checkpointed_ema': checkpointed_ema}}, sys.argv[1])

def whole_weights(model):
    '''The weights and their averages by name, whole (FSDP2's DTensor shards gathered).'''
    model = getattr(model, 'module', model)  # under DDP
    full = lambda t: (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach().clone()
    averages = model.ema.state().items()
    return {{n: full(p) for n, p in model.named_parameters()}}, {{n: full(a) for n, a in averages}}

cfg = load_config({yaml!r}, sys.argv[2:])
trainer = train.main(cfg, return_trainer=True, do_train=False)
trainer.state.callbacks.append(RecordOrder())
trainer.fit()
"""


def run(tmp_path, name: str, ranks: int, overrides: list[str], stop_at: int | None = None) -> dict:
    """Trains with `ranks` processes (the composer launcher, gloo) and returns rank 0's record."""
    driver = tmp_path / 'driver.py'
    yaml = str(REPO / 'yamls' / 'cdcd-tiny.yaml')
    driver.write_text(textwrap.dedent(DRIVER.format(repo=str(REPO), yaml=yaml)))
    record = tmp_path / f'{name}.pt'
    env = dict(os.environ, OMP_NUM_THREADS='1', **({'STOP_AT': str(stop_at)} if stop_at else {}))
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    cmd = [launcher, '-n', str(ranks), '--stderr', str(tmp_path / f'{name}-err{{rank}}.txt'), str(driver),
           str(record), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = ''.join(p.read_text()[-1500:] for p in tmp_path.glob(f'{name}-err*.txt'))
    assert proc.returncode == 0, proc.stderr[-1500:] + errors
    return torch.load(record)


def assert_same_weights(weights: dict, reference: dict) -> None:
    """Every tensor within a relative 1e-4 of its reference: max |a - b| <= 1e-4 max |b|."""
    assert weights.keys() == reference.keys()
    for name, weight in weights.items():
        scale = reference[name].abs().max().clamp_min(1e-12)
        gap = (weight - reference[name]).abs().max() / scale
        assert gap <= 1e-4, f'{name}: differs by {gap:.2e} of its scale'


def common_overrides(dataset, out) -> list[str]:
    """cdcd-tiny shrunk, refitting every 2 batches, with EMA and conditioning masks, without evals,
    samples or export."""
    return [
        *tiny_overrides(dataset, out), 'eval_interval=100ba', 'callbacks.training_samples=false',
        'callbacks.export_weights=false', 'callbacks.time_warp_refit.interval=2ba',
        'callbacks.time_warp_refit.min_evidence=0', 'callbacks.time_warp_refit.min_group_points=4',
        'callbacks.time_warp_refit.buffer_size=64', 'callbacks.time_warp_refit.n_bins=8',
        'algorithms.ema={half_life: 2ba}', 'masking={prefix: 0.4, random: 0.3, span: 0.3, drop: 0.2}',
    ]  # fmt: skip


@pytest.fixture(scope='module')
def straight(tiny_dataset, tmp_path_factory) -> dict:
    """The uninterrupted 8 batches on 1 process: one process trains the plain model whatever the
    parallelism config says, so every case below shares this reference."""
    out = tmp_path_factory.mktemp('straight')
    return run(
        out, 'straight', 1, [*common_overrides(tiny_dataset, out), 'max_duration=8ba', 'save_folder=null']
    )


@pytest.mark.parametrize(
    'before, after, strategy',
    # 1 -> 2 under DDP (a full checkpoint read by every rank) is the plainest path, and 1 -> 2 under
    # FSDP2 reads the same single file: it is left out to keep CI short.
    [(2, 1, 'ddp'), (2, 1, 'fsdp2-sharded'), (1, 2, 'fsdp2-sharded')],
)
def test_a_resume_on_another_number_of_ranks_reads_the_uninterrupted_sample_order(
    tiny_dataset, tmp_path, before, after, strategy, straight
):
    """2 -> 1 under DDP also trains 2 ranks the whole way: 1 process and 2 ranks train the same weights."""
    common = common_overrides(tiny_dataset, tmp_path)
    if strategy == 'fsdp2-sharded':
        # 2 ranks write one shard file per rank, which DCP reshards when loaded on 1 (FSDP kept to load
        # it); 1 process trains without FSDP and writes one file, which 2 FSDP ranks load whole.
        common.append('parallelism_config={fsdp: {state_dict_type: sharded}}')
    # The 8-batch run stopped after batch 4 (its schedule is the 8-batch one), then resumed. 2 ranks
    # under DDP run all 8 batches in microbatches of 2 instead, and are the 1-process run's twin.
    whole = (before, strategy) == (2, 'ddp')
    first = run(
        tmp_path,
        'first',
        before,
        [
            *common,
            'max_duration=8ba',
            f'save_folder={tmp_path}/ckpt',
            'save_num_checkpoints_to_keep=-1',  # batch 4's stays beside batch 8's
            *(['device_train_microbatch_size=2'] * whole),
        ],
        stop_at=None if whole else '4',
    )
    if whole:  # self-conditioning, masks and refits on, the same seed and global batch
        assert straight['fit_count'] == first['fit_count'] == 4  # the same (t, CE) pairs, the same curves
        torch.testing.assert_close(first['masses'], straight['masses'], rtol=1e-4, atol=0)
        assert_same_weights(first['final'], straight['final'])
        assert_same_weights(first['final_ema'], straight['final_ema'])
    sharded = strategy == 'fsdp2-sharded' and before == 2
    checkpoint = tmp_path / 'ckpt' / ('ep0-ba4' if sharded else 'ep0-ba4-rank0.pt')
    assert checkpoint.exists()
    resumed = run(tmp_path, 'resumed', after, [
        *common, 'max_duration=8ba', 'save_folder=null', f'load_path={checkpoint}',
    ])  # fmt: skip
    assert sorted(straight['batches']) == list(range(1, 9)) and sorted(resumed['batches']) == [5, 6, 7, 8]
    # The same samples in every global batch, on either number of ranks (how a batch is split
    # between ranks, and so its order, depends on the world size) ...
    for batch in range(1, 5):
        assert sorted(first['batches'][batch]) == sorted(straight['batches'][batch]), batch
    for batch in range(5, 9):  # ... and after the resume on the other number
        assert sorted(resumed['batches'][batch]) == sorted(straight['batches'][batch]), batch
    assert len(set().union(*map(set, straight['batches'].values()))) == 8 * 8  # no sample twice
    # The time-warp state carries across: the buffer kept filling from where it was.
    assert resumed['n_seen'] == straight['n_seen'] == 8 * 8
    # The resumed run starts from the checkpoint's weights (and averages), whole.
    for name, weight in first['checkpointed'].items():
        assert torch.equal(resumed['loaded'][name], weight), name
    assert resumed['loaded_ema'].keys() == first['checkpointed_ema'].keys()
    for name, average in first['checkpointed_ema'].items():
        assert torch.equal(resumed['loaded_ema'][name], average), name
    # ... and ends where the uninterrupted run ended.
    assert_same_weights(resumed['final'], straight['final'])
    assert_same_weights(resumed['final_ema'], straight['final_ema'])
