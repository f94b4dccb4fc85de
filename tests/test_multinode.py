"""Simulated nodes on this machine: one `composer` launcher per node, joined by
`--world_size W --node_rank i --master_addr 127.0.0.1`. Node 0 once died in Streaming's
machine-wide shared-memory clean-up, which unlinked the other node's live registrations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO
from s3_server import free_port
from shipped import shrunk_overrides
from test_distributed import DRIVER, REFIT

from cdcd_composer.workarounds import SHM_NAMESPACE_ENV

pytestmark = pytest.mark.slow


def launch_nodes(tmp_path: Path, overrides: list[str], nodes: int, ranks_per_node: int) -> list[dict]:
    """Runs the recording driver on `nodes` launchers of `ranks_per_node` ranks; returns each record."""
    driver = tmp_path / 'driver.py'
    yaml = str(REPO / 'yamls' / 'cdcd-tiny.yaml')
    driver.write_text(textwrap.dedent(DRIVER.format(repo=str(REPO), out=str(tmp_path), yaml=yaml)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('FSDP_VERSION', None)
    env.pop(SHM_NAMESPACE_ENV, None)  # each node's own, from its node rank: two nodes share this host
    launcher, port, world = Path(sys.executable).parent / 'composer', free_port(), nodes * ranks_per_node
    procs = [
        subprocess.Popen(
            [
                str(launcher),
                '-n',
                str(ranks_per_node),
                '--world_size',
                str(world),
                '--node_rank',
                str(node),
                '--master_addr',
                '127.0.0.1',
                '--master_port',
                str(port),
                '--stderr',
                str(tmp_path / f'err-node{node}-{{local_rank}}.txt'),
                str(driver),
                *overrides,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(nodes)
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    errors = ''.join(log.read_text()[-1500:] for log in sorted(tmp_path.glob('err-node*.txt')))
    assert [proc.returncode for proc in procs] == [0] * nodes, ''.join(o[-6000:] for o in outputs) + errors
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(world)]


def sharded_overrides(dataset: Path, tmp_path: Path, steps: int) -> list[str]:
    return [
        *shrunk_overrides(
            'cdcd-tiny', dataset, tmp_path, batches=steps, eval_every=steps // 2, save_every=steps // 2
        ),
        *[f'callbacks.time_warp_refit.{k}={v}' for k, v in REFIT.items()],
        'parallelism_config.fsdp.state_dict_type=sharded',
    ]


def assert_ranks_agree(ranks: list[dict], steps: int) -> None:
    """Every rank trained `steps` batches, refitted twice, and holds the same warp and eval metrics."""
    assert all(len(r['losses']) == steps for r in ranks)
    assert {r['fit_count'] for r in ranks} == {2}
    for rank in ranks[1:]:
        for key in ranks[0]['warp']:
            assert torch.equal(ranks[0]['warp'][key], rank['warp'][key]), key
        assert rank['eval'] == ranks[0]['eval'] and len(rank['eval']) == 9


def test_hybrid_sharding_shards_inside_a_node_and_replicates_across_nodes(tiny_dataset, tmp_path):
    """Two nodes on one machine train together and agree (every rank's warp and metrics), and
    HSDP on 2 nodes x 2 ranks: every parameter is a DTensor on a 2x2 mesh placed (Replicate, Shard(0));
    ranks 0 and 2 (shard 0 of each replica) hold bit-identical shards after training, which only holds
    if the gradients were reduced across the nodes; ranks 0 and 1 hold different halves."""
    overrides = [
        *sharded_overrides(tiny_dataset, tmp_path, steps=8),
        'parallelism_config.fsdp.data_parallel_shard_degree=2',
        'parallelism_config.fsdp.data_parallel_replicate_degree=-1',
    ]
    ranks = launch_nodes(tmp_path, overrides, nodes=2, ranks_per_node=2)
    assert_ranks_agree(ranks, steps=8)
    for rank in ranks:
        assert rank['meshes'] == {((2, 2), ('R', 'S(0)'))}  # (Replicate(), Shard(0))
        assert rank['sharded_blocks'] == rank['blocks'] > 0
    for replica_a, replica_b in ((0, 2), (1, 3)):
        for name, shard in ranks[replica_a]['local_params'].items():
            assert torch.equal(shard, ranks[replica_b]['local_params'][name]), name
    halves = ranks[0]['local_params'], ranks[1]['local_params']
    assert any(not torch.equal(halves[0][n], halves[1][n]) for n in halves[0] if halves[0][n].numel())

    # One file per shard, not per rank: the second node's replica writes nothing.
    assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'ep0-ba8').glob('*.distcp')) == [
        '__0_0.distcp',
        '__1_0.distcp',
    ]

    # That checkpoint resumes under plain FSDP2 on 2 ranks of one node: DCP reshards the
    # (Replicate, Shard) parameters onto the 1-D mesh, and the time-warp state carries over.
    elsewhere = tmp_path / 'plain'
    elsewhere.mkdir()
    plain = [*sharded_overrides(tiny_dataset, elsewhere, steps=8), 'max_duration=12ba']
    resumed = launch_nodes(
        elsewhere, [*plain, f'load_path={tmp_path}/checkpoints/ep0-ba8'], nodes=1, ranks_per_node=2
    )
    assert all(len(r['losses']) == 4 for r in resumed)  # batches 9-12 only
    assert all(r['meshes'] == {((2,), ('S(0)',))} for r in resumed)
    assert {r['fit_count'] for r in resumed} == {3}  # two refits restored with the checkpoint, one after
