"""Cost of the time-warp refit's per-batch all-gather as the number of ranks grows (CPU, gloo).

    python bench/refit_gather.py                  # 1, 2 and 4 ranks, 32 sequences per rank
    python bench/refit_gather.py --ranks 1 2 4 8 --per_rank 64

Every batch, `TimeWarpRefit` gathers a (4, sequences-per-rank) float64 tensor from every rank
(t, CE, F'(t), share of given tokens) into a ring buffer that every rank holds. Each row here is
`composer -n RANKS` timing that gather (median of `--iterations`), the bytes each rank receives,
and the refit of a full buffer (which every rank computes on the same data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(per_rank: int, iterations: int, buffer_size: int, out: str) -> None:
    """One rank's part: times the gather (and, on rank 0, one refit) and writes rank 0's figures."""
    import torch
    from composer.utils import dist, get_device

    from cdcd_composer.time_warping import TimeWarp

    dist.initialize_dist(get_device('cpu'))
    local = torch.rand(4, per_rank, dtype=torch.float64)
    times = []
    for _ in range(iterations):
        dist.barrier()
        start = time.perf_counter()
        gathered = torch.cat(dist.all_gather(local), dim=1) if dist.get_world_size() > 1 else local
        times.append(time.perf_counter() - start)
    warp = TimeWarp(1.0, 300.0)
    t = warp.sample_t(buffer_size).double()
    start = time.perf_counter()
    warp.fit(t, (t / 300.0).sqrt() + 0.1 * torch.rand(buffer_size, dtype=torch.float64))
    refit = time.perf_counter() - start
    if dist.get_global_rank() == 0:
        with open(out, 'w') as f:
            row = {'gather_s': statistics.median(times), 'bytes': gathered.numel() * 8, 'refit_s': refit}
            json.dump(row, f)


def main() -> None:
    """Prints one row per rank count."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ranks', type=int, nargs='+', default=[1, 2, 4])
    p.add_argument('--per_rank', type=int, default=32, help='sequences per rank per batch')
    p.add_argument('--iterations', type=int, default=200)
    p.add_argument('--buffer_size', type=int, default=16384)
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        measure(args.per_rank, args.iterations, args.buffer_size, args.worker)
        return
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    print(f'gloo on CPU, {args.per_rank} sequences per rank, median of {args.iterations} gathers')
    print(f'{"ranks":>6}{"gather ms":>12}{"bytes received":>16}{"refit ms":>10}')
    for ranks in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, 'row.json')
            cmd = [launcher, '-n', str(ranks), os.path.abspath(__file__), *sys.argv[1:], '--worker', out]
            env = dict(os.environ, OMP_NUM_THREADS='1')
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f'{ranks} ranks failed:\n{proc.stderr[-2000:]}')
            with open(out) as f:
                row = json.load(f)
        print(f'{ranks:>6}{row["gather_s"] * 1e3:>12.3f}{row["bytes"]:>16,}{row["refit_s"] * 1e3:>10.1f}')


if __name__ == '__main__':
    main()
