r"""Converts stories to MDS shards (train and val) with the tokenizer saved beside them.

TinyStories from the Hugging Face hub with bert-base-uncased (the default):

    python data_prep/convert_tinystories.py --out_root data/tinystories

The original text files (stories separated by <|endoftext|>), straight to S3:

    python data_prep/convert_tinystories.py --source files \
        --train_files TinyStoriesV2-GPT4-train.txt --val_files TinyStoriesV2-GPT4-valid.txt \
        --out_root s3://my-bucket/datasets/tinystories-v2

JSON Lines or Parquet files (globs welcome), validation carved out of train, a tokenizer trained
offline, stories packed into full windows:

    python data_prep/convert_tinystories.py --source files --train_files 'shards/*.parquet' \
        --val_fraction 0.01 --train_tokenizer 8192 --layout packed --out_root data/mine

The offline synthetic corpus (used by `make demo` and the tests):

    python data_prep/convert_tinystories.py --source synthetic --out_root data/synthetic

A rerun of an interrupted conversion keeps the splits already complete and redoes the rest; a
complete dataset made with other settings is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cdcd_composer.data.conversion import SOURCES, ConvertOptions, convert
from cdcd_composer.data.encoding import LAYOUTS, OVERFLOWS
from cdcd_composer.outputs import error_line


def parse_args(argv: list[str] | None = None) -> ConvertOptions:
    """Command-line options into a `ConvertOptions`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ConvertOptions(out_root='')
    p.add_argument('--out_root', required=True, help='local directory or s3://bucket/prefix')
    p.add_argument('--source', choices=SOURCES, default=d.source)
    p.add_argument(
        '--train_files', nargs='+', default=[], metavar='FILE_OR_GLOB', help='.txt .jsonl .json .parquet'
    )
    p.add_argument('--val_files', nargs='+', default=[], metavar='FILE_OR_GLOB')
    p.add_argument('--dataset', default=d.dataset, help='hub dataset name (--source hub)')
    p.add_argument('--hub_train_split', default=d.hub_train_split)
    p.add_argument('--hub_val_split', default=d.hub_val_split)
    p.add_argument('--text_column', default=d.text_column, help='story field of JSON, Parquet and hub rows')
    p.add_argument('--val_fraction', type=float, default=None, help='carve validation out of train (seeded)')
    p.add_argument(
        '--tokenizer', default=None,
        help="hub name, local directory, BERT vocab.txt, or 'bytes' (one token per UTF-8 byte)",
    )  # fmt: skip
    p.add_argument(
        '--train_tokenizer', type=int, default=None, metavar='VOCAB_SIZE', help='train WordPiece offline'
    )
    p.add_argument('--seq_len', type=int, default=d.seq_len, help='canvas length, framing tokens included')
    p.add_argument('--layout', choices=LAYOUTS, default=d.layout)
    p.add_argument('--overflow', choices=OVERFLOWS, default=d.overflow, help='over-long stories')
    p.add_argument('--num_train', type=int, default=None, help='at most this many training stories')
    p.add_argument('--num_val', type=int, default=None)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument(
        '--max_story_chars',
        type=int,
        default=d.max_story_chars,
        help='longer stories are skipped; tokenizing a story takes ~150 bytes of memory per character '
        '(measured: 8.9 GB for a 60 MB story), so keep it well below your memory / 150',
    )
    p.add_argument('--num_workers', type=int, default=None, help='tokenizer processes (default: all cores)')
    p.add_argument('--batch_stories', type=int, default=d.batch_stories)
    p.add_argument('--size_limit', default=d.size_limit, help='shard size before compression')
    p.add_argument('--overwrite', action='store_true', help='replace a dataset made with other settings')
    p.add_argument('--no_progress', dest='progress', action='store_false')
    args = p.parse_args(argv)
    return ConvertOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; every failure is one line on stderr and a non-zero exit."""
    opt = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        meta = convert(opt)
    except (ValueError, OSError) as e:
        print(f'error: {error_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f'interrupted: {opt.out_root} holds only completed splits; rerun the same command to finish',
            file=sys.stderr,
        )
        return 130
    print(f'wrote {meta.num_examples} examples ({meta.num_truncated} truncated) to {opt.out_root}')
    return 0
