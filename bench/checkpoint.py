"""Checkpoint cost next to a training step, for cdcd-5m on CPU, measured in one run.

    python bench/checkpoint.py            # batch 32 x 128, vocabulary 30522, 2 threads

Times a training step (forward, backward, AdamW), writing the model + optimizer state the way
a Composer checkpoint holds them (`torch.save`), and uploading that file to an S3-compatible
server (`moto_server` started on 127.0.0.1, as in the tests). Composer writes the file in the
training process and uploads it from background processes, so the step pays for the save; the
upload overlaps training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]

from s3_server import DUMMY_CREDENTIALS, free_port, start_moto_server  # noqa: E402

from bench.time_warp import step_seconds  # noqa: E402
from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='yamls/cdcd-5m.yaml')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--vocab_size', type=int, default=30522)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with open(os.path.join(REPO, args.config)) as f:
        model_cfg = dict(yaml.safe_load(f)['model'], vocab_size=args.vocab_size)
    model = CDCDComposerModel(model_cfg, t_max=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {'tokens': torch.randint(0, args.vocab_size, (args.batch, args.seq_len))}
    step_s = step_seconds(model, batch, 3, optimizer)  # Also fills the AdamW state that is saved.

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'ep0-ba1-rank0.pt')
        start = time.perf_counter()
        torch.save({'state': {'model': model.state_dict(), 'optimizers': optimizer.state_dict()}}, path)
        save_s = time.perf_counter() - start
        size_mb = os.path.getsize(path) / 1e6

        port = free_port()
        server = start_moto_server(port, os.path.join(tmp, 'moto.log'))
        try:
            os.environ.update(DUMMY_CREDENTIALS, S3_ENDPOINT_URL=f'http://127.0.0.1:{port}')
            import boto3
            from composer.utils.object_store import S3ObjectStore

            boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL']).create_bucket(Bucket='bench')
            store = S3ObjectStore(bucket='bench')
            store.upload_object('warmup', path)
            start = time.perf_counter()
            store.upload_object('runs/bench/checkpoints/ep0-ba1-rank0.pt', path)
            upload_s = time.perf_counter() - start
        finally:
            server.terminate()

    name = os.path.basename(args.config).removesuffix('.yaml')
    print(
        f'{name}: batch {args.batch} x {args.seq_len}, vocabulary {args.vocab_size}, {args.threads} threads'
    )
    print(f'checkpoint (model + AdamW state): {size_mb:.0f} MB')
    print(f'{"":<34}{"seconds":>9}{"x step":>8}')
    print(f'{"training step":<34}{step_s:>9.2f}{1.0:>8.2f}')
    print(f'{"torch.save (blocks the step)":<34}{save_s:>9.2f}{save_s / step_s:>8.2f}')
    print(f'{"upload to S3 (background)":<34}{upload_s:>9.2f}{upload_s / step_s:>8.2f}')


if __name__ == '__main__':
    main()
