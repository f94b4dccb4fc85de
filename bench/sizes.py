"""Model sizes of each YAML, stated the same way for every model: the table behind the YAML headers.

    python bench/sizes.py                       # every yamls/*.yaml
    python bench/sizes.py yamls/cdcd-5m.yaml --vocab_size 30522 --seq_len 128

Columns: all parameters; non-embedding parameters (without the embedding table and the
vocabulary-sized output head); the output head alone; and the matmul FLOPs of one forward
pass per token (attention included, at the given canvas length). The model is built on the
meta device, so no memory is used.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402

# The vocabulary a YAML's default data has when its model leaves vocab_size null.
DEFAULT_VOCAB = {'cdcd-tiny': 666, 'cdcd-char': 261}  # make demo's synthetic corpus; bytes
BERT_VOCAB = 30522


def sizes(model_cfg: dict, seq_len: int) -> dict[str, float]:
    """Parameter counts and forward FLOPs per token of one architecture."""
    with torch.device('meta'):
        model = CDCDComposerModel(model_cfg)
    inner = model.model
    rows, columns = inner.alignment_padding()  # GEMM alignment, not model capacity
    head = 0 if model.config.tie_output_head else inner.head.weight.numel() + inner.head.bias.numel()
    head -= rows * (inner.head.in_features + 1)
    return {
        'total': sum(p.numel() for p in inner.parameters())
        - rows * (inner.head.in_features + 1)
        - columns * model.config.d_model,
        'non_embedding': inner.non_embedding_parameters(),
        'head': head,
        'flops_per_token': model.forward_flops(1, seq_len) / seq_len,
    }


def main(argv: list[str] | None = None) -> None:
    """Prints one Markdown row per YAML."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('configs', nargs='*', default=sorted(glob.glob(os.path.join(REPO, 'yamls', '*.yaml'))))
    p.add_argument('--vocab_size', type=int, default=None, help="default: the YAML's data (BERT: 30522)")
    p.add_argument('--seq_len', type=int, default=128)
    args = p.parse_args(argv)
    print('| config | vocab | parameters | non-embedding | output head | forward GFLOPs/token |')
    print('|---|---|---|---|---|---|')
    for path in args.configs:
        name = os.path.splitext(os.path.basename(path))[0]
        model_cfg = yaml.safe_load(open(path))['model']
        vocab = args.vocab_size or model_cfg.get('vocab_size') or DEFAULT_VOCAB.get(name, BERT_VOCAB)
        row = sizes({**model_cfg, 'vocab_size': vocab}, args.seq_len)
        print(
            f'| {name} | {vocab} | {row["total"] / 1e6:.2f}M | {row["non_embedding"] / 1e6:.2f}M | '
            f'{row["head"] / 1e6:.2f}M | {row["flops_per_token"] / 1e9:.4f} |'
        )


if __name__ == '__main__':
    main()
