"""The conversion pipeline: stories from a source, cleaned, tokenized and written as MDS splits.

`convert(ConvertOptions)` makes (or completes) a dataset root: train/ and val/ shards with their
manifests, the tokenizer beside them and `cdcd_dataset.json`. `data_prep/convert_tinystories.py`
(`cdcd_composer.commands.convert`) is its command line.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Iterator

from streaming.base.util import bytes_to_int
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from cdcd_composer.data.encoding import CanvasSpec, clean_story, encode_all
from cdcd_composer.data.grammar import StoryGrammar
from cdcd_composer.data.metadata import METADATA_FILE, SPLITS, TOKENIZER_DIR, DatasetMetadata
from cdcd_composer.data.options import LAYOUTS, OVERFLOWS, SOURCES, ConvertOptions  # noqa: F401 (importers)
from cdcd_composer.data.sources import Record, carve, concat_files, expand_files, hub_stories
from cdcd_composer.data.splits import SplitWriter
from cdcd_composer.data.stats import SplitStats
from cdcd_composer.data.tokenization import load_tokenizer, train_wordpiece
from cdcd_composer.storage import MANIFEST_FILE, OWNER_MARKER, Folder, reporting_storage_faults
from cdcd_composer.story_tokens import StoryTokens, tokenizer_sha256

log = logging.getLogger('convert_tinystories')

SYNTHETIC_DEFAULT_COUNTS = {'train': 20_000, 'val': 1_000}
SYNTHETIC_TOKENIZER_VOCAB = 1024


def check_options(opt: ConvertOptions) -> None:
    """Every check that reads no data: choices, ranges, files and globs. Expands file globs.

    Raises:
        ValueError: one line naming the option and the fix.
    """
    if opt.source not in SOURCES:
        raise ValueError(f'--source {opt.source!r} is not one of {SOURCES}')
    if opt.layout not in LAYOUTS:
        raise ValueError(f'--layout {opt.layout!r} is not one of {LAYOUTS}')
    if opt.overflow not in OVERFLOWS:
        raise ValueError(f'--overflow {opt.overflow!r} is not one of {OVERFLOWS}')
    if opt.seq_len < 8:
        raise ValueError(f'--seq_len {opt.seq_len} is too short; use at least 8')
    if opt.val_fraction is not None and not 0 < opt.val_fraction < 1:
        raise ValueError(f'--val_fraction {opt.val_fraction} must be between 0 and 1')
    if opt.tokenizer is not None and opt.train_tokenizer is not None:
        raise ValueError('give --tokenizer or --train_tokenizer, not both')
    if opt.train_tokenizer is not None and opt.train_tokenizer < 16:
        raise ValueError(f'--train_tokenizer {opt.train_tokenizer} is too small; use at least 16')
    for name in ('num_train', 'num_val', 'max_story_chars', 'batch_stories'):
        if getattr(opt, name) is not None and getattr(opt, name) <= 0:
            raise ValueError(f'--{name} must be positive, got {getattr(opt, name)}')
    if opt.num_workers is not None and opt.num_workers < 0:
        raise ValueError(f'--num_workers must be >= 0, got {opt.num_workers}')
    try:
        shard_bytes = bytes_to_int(opt.size_limit)
    except ValueError:
        shard_bytes = 0
    if shard_bytes < 1 << 10:  # Streaming writes a shard per example below a few bytes
        raise ValueError(f'--size_limit {opt.size_limit!r} must be a size of at least 1kb, e.g. 64mb')
    if opt.source == 'files':
        if not opt.train_files:
            raise ValueError('--source files needs --train_files FILE_OR_GLOB [...]')
        if not opt.val_files and opt.val_fraction is None:
            raise ValueError('no validation data: give --val_files or carve it with --val_fraction 0.01')
        if opt.val_files and opt.val_fraction is not None:
            raise ValueError('give --val_files or --val_fraction, not both')
        opt.train_files = expand_files(opt.train_files)
        opt.val_files = expand_files(opt.val_files)
    elif opt.train_files or opt.val_files:
        raise ValueError(f'--train_files/--val_files need --source files (got --source {opt.source})')
    if opt.source == 'synthetic':
        if opt.val_fraction is not None:
            raise ValueError('--source synthetic has its own validation split; drop --val_fraction')
        if opt.tokenizer is None and opt.train_tokenizer is None:
            opt.train_tokenizer = SYNTHETIC_TOKENIZER_VOCAB


def split_records(opt: ConvertOptions, split: str) -> Iterator[Record]:
    """The records of one split, carved and limited as the options say."""
    limit = opt.num_train if split == 'train' else opt.num_val
    if opt.source == 'synthetic':
        n = limit or SYNTHETIC_DEFAULT_COUNTS[split]
        return StoryGrammar(seed=opt.seed if split == 'train' else opt.seed + 1_000_003).stories(n)
    if opt.val_fraction is not None:
        records = carve(_source_records(opt, 'train'), opt.val_fraction, opt.seed, keep_carved=split == 'val')
    else:
        records = _source_records(opt, split)
    return itertools.islice(records, limit)


def _source_records(opt: ConvertOptions, split: str) -> Iterator[Record]:
    if opt.source == 'hub':
        return hub_stories(
            opt.dataset, opt.hub_train_split if split == 'train' else opt.hub_val_split, opt.text_column
        )
    files = opt.train_files if split == 'train' else opt.val_files
    return concat_files(files, opt.text_column, max_story_bytes=4 * opt.max_story_chars)


def source_description(opt: ConvertOptions, split: str) -> str:
    """A one-line statement of where a split came from, for the manifest and metadata."""
    if opt.source == 'synthetic':
        return f'synthetic grammar, seed {opt.seed}'
    base = f'hub:{opt.dataset}' if opt.source == 'hub' else 'files'
    if opt.val_fraction is not None:
        side = 'carved' if split == 'val' else 'rest'
        return f'{base} train, {side} of a {opt.val_fraction} carve (seed {opt.seed})'
    if opt.source == 'hub':
        return f'{base} split {opt.hub_train_split if split == "train" else opt.hub_val_split}'
    return f'files: {opt.train_files if split == "train" else opt.val_files}'


def build_tokenizer(opt: ConvertOptions) -> tuple[PreTrainedTokenizerFast, str]:
    """(tokenizer, name): loaded by name/path/vocab.txt, or trained on the training split."""
    if opt.train_tokenizer is None:
        name = opt.tokenizer or 'bert-base-uncased'
        return load_tokenizer(name), name
    log.info('training a WordPiece tokenizer (%d tokens) on the training split', opt.train_tokenizer)
    texts = (text for text, _ in map(_clean, split_records(opt, 'train')) if text is not None)
    return train_wordpiece(
        texts, vocab_size=opt.train_tokenizer
    ), f'wordpiece-{opt.train_tokenizer}-trained-on-{opt.source}'


def _clean(record: Record) -> tuple[str | None, str]:
    return clean_story(record, max_chars=10**12)


def tokenizer_in_root(root: Folder, opt: ConvertOptions) -> tuple[PreTrainedTokenizerFast, str]:
    """The tokenizer saved in the root by an earlier run with the same settings, else a new one."""
    manifest = root.read_json(f'{TOKENIZER_DIR}/{MANIFEST_FILE}')
    if manifest is not None and manifest.get('settings') == opt.tokenizer_settings():
        with tempfile.TemporaryDirectory() as tmp:
            local = (
                root.join(TOKENIZER_DIR) if root.store is None else root.fetch_directory(TOKENIZER_DIR, tmp)
            )
            log.info('reusing the tokenizer of the interrupted run in %s', root.join(TOKENIZER_DIR))
            return load_tokenizer(local), manifest['name']
    tokenizer, name = build_tokenizer(opt)
    with root.staged_directory(TOKENIZER_DIR, 10**6, 'the tokenizer') as staging:
        tokenizer.save_pretrained(staging)
        Folder(staging).write_json(
            MANIFEST_FILE, {'settings': opt.tokenizer_settings(), 'name': name, 'vocab_size': len(tokenizer)}
        )
    return tokenizer, name


def write_split(
    opt: ConvertOptions, root: Folder, split: str, tokenizer: PreTrainedTokenizerFast, name: str
) -> dict:
    """Encodes and writes one split; returns its manifest."""
    ids = StoryTokens.of(tokenizer)
    dtype = 'uint16' if len(tokenizer) <= 2**16 else 'int32'
    spec = CanvasSpec(
        opt.seq_len, opt.layout, opt.overflow, ids.bos, ids.eos, ids.pad, opt.max_story_chars, dtype
    )
    workers = opt.num_workers if opt.num_workers is not None else (os.cpu_count() or 1)
    stats = SplitStats(len(tokenizer))
    records = split_records(opt, split)
    chunks = encode_all(records, tokenizer.backend_tokenizer.to_str(), spec, workers, opt.batch_stories)
    bar = tqdm(desc=f'{split}', unit=' stories', disable=not opt.progress, mininterval=1.0, smoothing=0.1)
    with SplitWriter(root, split, opt.seq_len, dtype, opt.size_limit) as writer, bar:
        for chunk in chunks:
            if opt.layout == 'packed':
                writer.write_stream(chunk.stream)
            else:
                writer.write_examples(chunk.examples)
            stats.add(chunk)
            bar.update(chunk.counts['stories'])
        if not writer.examples:
            raise no_stories(opt, split, stats)
        manifest = split_manifest(opt, split, tokenizer, name, dtype, stats, writer)
        writer.commit(manifest)
    c = manifest['counts']
    log.info(
        '%s: %d stories read, %d examples, %d truncated, %d split, skipped %s -> %s',
        split,
        c['stories_read'],
        c['examples'],
        c['truncated'],
        c['split_across_examples'],
        c['skipped'] or 'none',
        root.join(split),
    )
    return manifest


def no_stories(opt: ConvertOptions, split: str, stats: SplitStats) -> ValueError:
    """The error of a split whose every story was skipped: where from, how many, why, what to change."""
    reasons = {k.removeprefix('skipped_'): v for k, v in stats.counts.items() if k.startswith('skipped_')}
    if set(reasons) == {'too_long'}:
        fix = 'raise --max_story_chars or split the stories'
    elif 'bad_record' in reasons:
        fix = f'records without a field {opt.text_column!r} are skipped: set --text_column to the story field'
    else:
        fix = 'check the source files'
    files = opt.val_files if split == 'val' and opt.val_files else opt.train_files
    source = ', '.join(files[:3]) if opt.source == 'files' else f'--source {opt.source}'
    return ValueError(
        f'split {split!r} from {source} has no stories ({stats.stories_read} read, all skipped: '
        f'{", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) or "empty"}); {fix}'
    )


def split_manifest(
    opt: ConvertOptions,
    split: str,
    tokenizer: PreTrainedTokenizerFast,
    name: str,
    dtype: str,
    stats: SplitStats,
    writer: SplitWriter,
) -> dict:
    """A split's `manifest.json`: its source, tokenizer, canvas, statistics and the command that made it."""
    ids = StoryTokens.of(tokenizer)
    return {
        'split': split,
        'source': source_description(opt, split),
        'tokenizer': {
            'name': name,
            'sha256': tokenizer_sha256(tokenizer),
            'vocab_size': len(tokenizer),
            'bos_id': ids.bos,
            'eos_id': ids.eos,
            'pad_id': ids.pad,
        },
        'layout': opt.layout,
        'overflow': opt.overflow,
        'seq_len': opt.seq_len,
        'token_dtype': dtype,
        **stats.summary(
            examples=writer.examples,
            seq_len=opt.seq_len,
            dropped_tail_tokens=len(writer.carry),
            id_to_token=tokenizer.convert_ids_to_tokens,
            unk_id=tokenizer.unk_token_id,
        ),
        'command': opt.command(),
        'settings': opt.settings(),
    }


def convert(options: ConvertOptions | None = None, **kwargs) -> DatasetMetadata:
    """Converts a story source into `out_root/{train,val}` MDS shards, tokenizer and metadata.

    Accepts a `ConvertOptions` or its fields as keyword arguments. Checks everything cheap first
    (options, files, the output root), reuses what an interrupted run with the same settings
    completed, and writes `cdcd_dataset.json` last.

    Raises:
        ValueError: a bad option, unreadable source, unreachable or occupied output root.
    """
    opt = options or ConvertOptions(**kwargs)
    check_options(opt)
    root = Folder(opt.out_root)
    root.claim('--out_root')  # before the lock file: a folder of the user's is left as it was
    after = 'completed splits are kept: free space and rerun the same command to finish'
    with root.lock(), reporting_storage_faults('the dataset', opt.out_root, after):  # one writer per root
        root.remove_stale_staging()
        return _convert(opt, root)


def _convert(opt: ConvertOptions, root: Folder) -> DatasetMetadata:
    """`convert` while holding the root's lock."""
    settings = opt.settings()
    existing = root.read_json(METADATA_FILE)
    if existing is not None:
        if existing.get('settings') == settings and not opt.overwrite:
            log.info('%s already holds this dataset; nothing to do', opt.out_root)
            return DatasetMetadata.from_json(existing)
        if not opt.overwrite:
            raise ValueError(
                f'{opt.out_root} already holds a dataset made with other settings: pass --overwrite to '
                'replace it, or choose another --out_root'
            )
        root.remove(METADATA_FILE)  # From here on the old dataset no longer looks complete.
    for part in (*SPLITS, TOKENIZER_DIR):
        _refuse_foreign(root, part)

    tokenizer, name = tokenizer_in_root(root, opt)
    digest = tokenizer_sha256(tokenizer)
    manifests = {}
    for split in SPLITS:
        manifest = root.read_json(f'{split}/{MANIFEST_FILE}')
        # Equal settings are not enough: a retrained WordPiece may number its tokens differently.
        same_ids = manifest is not None and manifest.get('tokenizer', {}).get('sha256') == digest
        if manifest is not None and manifest.get('settings') == settings and same_ids and not opt.overwrite:
            log.info('%s: kept, completed by an earlier run with the same settings', split)
            manifests[split] = manifest
        else:
            manifests[split] = write_split(opt, root, split, tokenizer, name)
    ids = StoryTokens.of(tokenizer)
    meta = DatasetMetadata(
        seq_len=opt.seq_len,
        vocab_size=len(tokenizer),
        bos_id=ids.bos,
        eos_id=ids.eos,
        pad_id=ids.pad,
        layout=opt.layout,
        source=f'hub:{opt.dataset}' if opt.source == 'hub' else opt.source,  # 'synthetic': grammar applies.
        tokenizer=name,
        num_examples={s: m['counts']['examples'] for s, m in manifests.items()},
        num_truncated={s: m['counts']['truncated'] for s, m in manifests.items()},
        overflow=opt.overflow,
        token_dtype=manifests['train']['token_dtype'],
        settings=settings,
        tokenizer_sha256=digest,
    )
    root.write_json(METADATA_FILE, meta.to_json())  # Written last: marks the dataset complete.
    return meta


def _refuse_foreign(root: Folder, part: str) -> None:
    """Refuses to replace a split or tokenizer directory this converter did not write.

    Called only when the root holds no complete dataset. What carries our marker (or, from
    earlier versions, a manifest) is the leftover of an interrupted run and is kept (same
    settings) or redone; anything else is the user's, and --overwrite does not change that.
    """
    if not root.owns(part):
        raise ValueError(
            f'{root.join(part)} already exists and was not written by this converter (no '
            f'{OWNER_MARKER} marker): move it away or choose another --out_root'
        )
