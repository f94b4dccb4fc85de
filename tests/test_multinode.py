"""Two simulated nodes on this machine: two `composer` launchers, one rank each, joined by
`--world_size 2 --node_rank 0|1 --master_addr 127.0.0.1`. Before issue 17 node 0 died in Streaming's
machine-wide shared-memory clean-up, which unlinked the other node's live registrations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, two_rank_overrides
from s3_server import free_port
from test_distributed import DRIVER, REFIT

pytestmark = pytest.mark.slow


def test_two_nodes_on_one_machine_train_together_and_agree(tiny_dataset, tmp_path):
    driver = tmp_path / 'driver.py'
    yaml = str(REPO / 'yamls' / 'cdcd-tiny.yaml')
    driver.write_text(textwrap.dedent(DRIVER.format(repo=str(REPO), out=str(tmp_path), yaml=yaml)))
    overrides = [
        *two_rank_overrides(tiny_dataset, tmp_path, steps=8),
        *[f'callbacks.time_warp_refit.{k}={v}' for k, v in REFIT.items()],
        'parallelism_config.fsdp.state_dict_type=sharded',
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('FSDP_VERSION', None)
    launcher, port = Path(sys.executable).parent / 'composer', free_port()
    nodes = [
        subprocess.Popen(
            [
                str(launcher),
                '-n',
                '1',
                '--world_size',
                '2',
                '--node_rank',
                str(node),
                '--master_addr',
                '127.0.0.1',
                '--master_port',
                str(port),
                '--stderr',
                str(tmp_path / f'err-node{node}.txt'),
                str(driver),
                *overrides,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    errors = ''.join(
        (tmp_path / f'err-node{n}.txt').read_text()[-1500:]
        for n in (0, 1)
        if (tmp_path / f'err-node{n}.txt').exists()
    )
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-800:] + outputs[1][-800:] + errors
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    assert all(len(r['losses']) == 8 for r in ranks)
    assert ranks[0]['fit_count'] == ranks[1]['fit_count'] == 2
    for key in ranks[0]['warp']:
        assert torch.equal(ranks[0]['warp'][key], ranks[1]['warp'][key]), key
    assert ranks[0]['eval'] == ranks[1]['eval'] and len(ranks[0]['eval']) == 8
