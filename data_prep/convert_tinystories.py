"""Writes stories as MDS shards (train and val) with the tokenizer saved beside them.

Offline default corpus (used by `make demo` and the tests):

    python data_prep/convert_tinystories.py --source synthetic --out_root data/synthetic

TinyStories from the Hugging Face hub with the BERT tokenizer:

    python data_prep/convert_tinystories.py --source hub --out_root data/tinystories
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
from collections.abc import Iterable, Iterator

from cdcd_composer.data import (
    METADATA_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DatasetMetadata,
    encode_stories,
    write_split,
)
from cdcd_composer.grammar import StoryGrammar
from cdcd_composer.tokenization import StoryTokens, load_tokenizer, train_wordpiece

log = logging.getLogger('convert_tinystories')

SOURCES = ('synthetic', 'hub')


def synthetic_stories(split: str, n: int, seed: int) -> Iterator[str]:
    """Stories from the offline grammar; the validation split uses a disjoint seed."""
    return StoryGrammar(seed=seed if split == 'train' else seed + 1_000_003).stories(n)


def hub_stories(split: str, dataset: str, text_column: str, limit: int | None) -> Iterator[str]:
    """Streams a text column from a Hugging Face hub dataset (needs the internet)."""
    from datasets import load_dataset

    hub_split = {'train': 'train', 'val': 'validation'}[split]
    rows = load_dataset(dataset, split=hub_split, streaming=True)
    texts = (row[text_column] for row in rows)
    return itertools.islice(texts, limit) if limit else texts


def convert(
    *,
    source: str,
    out_root: str,
    seq_len: int = 128,
    tokenizer: str | None = None,
    train_tokenizer: int | None = None,
    num_train: int | None = None,
    num_val: int | None = None,
    seed: int = 17,
    dataset: str = 'roneneldan/TinyStories',
    text_column: str = 'text',
) -> DatasetMetadata:
    """Converts a story source into `out_root/{train,val}` MDS shards plus tokenizer and metadata.

    Args:
        source: 'synthetic' (offline grammar) or 'hub' (Hugging Face dataset `dataset`).
        out_root: Output directory; must not already hold a dataset.
        seq_len: Canvas length in tokens, `[CLS]` and `[SEP]` included.
        tokenizer: Hugging Face tokenizer name or local path (default: bert-base-uncased, or a
            trained WordPiece for the synthetic source).
        train_tokenizer: Train an uncased WordPiece tokenizer of this vocabulary size instead.
        num_train: Training stories (synthetic default 20000; hub default: all).
        num_val: Validation stories (synthetic default 1000; hub default: all).
        seed: Seed of the synthetic corpus.
        dataset: Hub dataset name.
        text_column: Hub dataset column holding the story text.
    """
    if source not in SOURCES:
        raise ValueError(f'--source {source!r} is not one of {SOURCES}')
    if seq_len < 8:
        raise ValueError(f'--seq_len {seq_len} is too short; use at least 8')
    if os.path.exists(os.path.join(out_root, METADATA_FILE)) or any(
        os.path.exists(os.path.join(out_root, s)) for s in SPLITS
    ):
        raise ValueError(f'{out_root} already holds a dataset: remove it or choose another --out_root')
    if source == 'synthetic':
        counts_wanted = {'train': num_train or 20_000, 'val': num_val or 1_000}

        def texts(split: str) -> Iterable[str]:
            return synthetic_stories(split, counts_wanted[split], seed)

        if tokenizer is None and train_tokenizer is None:
            train_tokenizer = 1024
    else:
        counts_wanted = {'train': num_train, 'val': num_val}

        def texts(split: str) -> Iterable[str]:
            return hub_stories(split, dataset, text_column, counts_wanted[split])

    if train_tokenizer is not None:
        tok = train_wordpiece(texts('train'), vocab_size=train_tokenizer)
        tokenizer_name = f'wordpiece-{train_tokenizer}-trained-on-{source}'
    else:
        tokenizer_name = tokenizer or 'bert-base-uncased'
        tok = load_tokenizer(tokenizer_name)
    ids = StoryTokens.of(tok)
    os.makedirs(out_root, exist_ok=True)
    tok.save_pretrained(os.path.join(out_root, TOKENIZER_DIR))

    examples, truncated = {}, {}
    for split in SPLITS:
        counts = {'examples': 0, 'truncated': 0}
        write_split(encode_stories(texts(split), tok, seq_len, counts), os.path.join(out_root, split))
        examples[split], truncated[split] = counts['examples'], counts['truncated']
        log.info(
            '%s: %d stories, %d truncated to %d tokens',
            split,
            counts['examples'],
            counts['truncated'],
            seq_len,
        )
    meta = DatasetMetadata(
        seq_len=seq_len,
        vocab_size=len(tok),
        bos_id=ids.bos,
        eos_id=ids.eos,
        pad_id=ids.pad,
        layout='padded',
        source=source if source == 'synthetic' else f'hub:{dataset}',
        tokenizer=tokenizer_name,
        num_examples=examples,
        num_truncated=truncated,
    )
    meta.save(out_root)  # Written last: its presence marks a complete dataset.
    return meta


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', choices=SOURCES, default='hub')
    p.add_argument('--out_root', required=True)
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--tokenizer', default=None, help='Hugging Face tokenizer name or local path')
    p.add_argument('--train_tokenizer', type=int, default=None, metavar='VOCAB_SIZE')
    p.add_argument('--num_train', type=int, default=None)
    p.add_argument('--num_val', type=int, default=None)
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--dataset', default='roneneldan/TinyStories')
    p.add_argument('--text_column', default='text')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    try:
        meta = convert(**vars(args))
    except ValueError as e:
        p.exit(2, f'error: {e}\n')
    print(f'wrote {meta.num_examples} stories ({meta.num_truncated} truncated) to {args.out_root}')


if __name__ == '__main__':
    main()
