"""The converter end to end: every source format, tokenizers, layouts, bad input, interruption, S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO

from cdcd_composer.commands.convert import main
from cdcd_composer.commands.train import main as train_main
from cdcd_composer.commands.train import validate as train_validate
from cdcd_composer.config import parse_config
from cdcd_composer.data import conversion as convert_tinystories
from cdcd_composer.data.conversion import convert
from cdcd_composer.data.grammar import StoryGrammar
from cdcd_composer.data.loaders import StoryDataset, build_dataloader, check_split
from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.data.sources import is_carved
from cdcd_composer.data.tokenization import load_tokenizer
from cdcd_composer.storage import LEASE_FILE, Folder, StorageError
from cdcd_composer.story_tokens import StoryTokens, tokenizer_sha256

STORIES = list(StoryGrammar(seed=3).stories(60))
SEQ_LEN = 48


def write_text(path: Path, stories: list[str]) -> Path:
    """The original TinyStories text format: stories separated by `<|endoftext|>` lines."""
    path.write_text('\n<|endoftext|>\n'.join(stories) + '\n')
    return path


def read_split(root: Path, split: str) -> np.ndarray:
    """All examples of a local split in order, shape (n, seq_len)."""
    dataset = StoryDataset(local=str(root / split), shuffle=False, batch_size=1)
    return np.stack([dataset[i]['tokens'].numpy() for i in range(len(dataset))])


def manifest(root: Path, split: str) -> dict:
    return json.loads((root / split / 'manifest.json').read_text())


def framed(tok, text: str) -> list[int]:
    """What the converter must write for one story: `[bos] tokenizer(text) [eos]`."""
    ids = StoryTokens.of(tok)
    return [ids.bos, *tok(text.strip(), add_special_tokens=False)['input_ids'], ids.eos]


def padded(tok, texts: list[str], seq_len: int = SEQ_LEN) -> np.ndarray:
    pad = StoryTokens.of(tok).pad
    rows = [(framed(tok, t) + [pad] * seq_len)[:seq_len] for t in texts]
    return np.array(rows)


def convert_files(out: Path, train: list, **kwargs) -> DatasetMetadata:
    kwargs = {'seq_len': SEQ_LEN, 'num_workers': 2, 'batch_stories': 7, 'progress': False} | kwargs
    return convert(source='files', out_root=str(out), train_files=[str(p) for p in train], **kwargs)


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer trained offline by the converter, saved beside its shards."""
    out = tmp_path_factory.mktemp('tok') / 'ds'
    src = write_text(out.parent / 'train.txt', STORIES)
    convert_files(out, [src], val_fraction=0.2, train_tokenizer=300)
    return out / 'tokenizer'


@pytest.mark.parametrize('fmt', ['txt', 'jsonl', 'json', 'parquet'])
def test_each_file_format_round_trips_to_the_tokenizer_output(fmt, tmp_path, tokenizer_dir):
    half = len(STORIES) // 2
    parts = [STORIES[:half], STORIES[half:]]
    files = []
    for i, part in enumerate(parts):
        path = tmp_path / f'part{i}.{fmt}'
        if fmt == 'txt':
            write_text(path, part)
        elif fmt == 'jsonl':
            path.write_text(''.join(json.dumps({'story': s, 'id': j}) + '\n' for j, s in enumerate(part)))
        elif fmt == 'json':
            path.write_text(json.dumps([{'story': s} for s in part]))
        else:
            pq.write_table(pa.table({'story': part, 'n': list(range(len(part)))}), path)
        files.append(path)
    out = tmp_path / 'ds'
    glob = str(tmp_path / f'part*.{fmt}')  # A glob matching both files, expanded in sorted order.
    meta = convert(
        source='files', out_root=str(out), train_files=[glob], val_files=[str(files[0])], seq_len=SEQ_LEN,
        tokenizer=str(tokenizer_dir), text_column='story', num_workers=2, batch_stories=7, progress=False,
    )  # fmt: skip
    tok = load_tokenizer(str(out / 'tokenizer'))
    np.testing.assert_array_equal(read_split(out, 'train'), padded(tok, STORIES))
    np.testing.assert_array_equal(read_split(out, 'val'), padded(tok, parts[0]))
    assert meta.num_examples == {'train': len(STORIES), 'val': half}
    assert meta.token_dtype == 'uint16' and meta.layout == 'padded'
    m = manifest(out, 'train')
    assert m['counts']['stories_read'] == len(STORIES) and m['counts']['skipped'] == {}
    assert m['story_tokens']['max'] == max(len(framed(tok, s)) for s in STORIES)
    assert m['token_dtype'] == 'uint16' and json.loads((out / 'train' / 'index.json').read_text())


def test_hub_source_streams_a_dataset_repository(tmp_path, tokenizer_dir):
    """`--source hub` through `datasets.load_dataset(..., streaming=True)`, offline: a local
    directory laid out like a hub dataset repository (splits named by file)."""
    repo = tmp_path / 'repo' / 'data'
    repo.mkdir(parents=True)
    pq.write_table(pa.table({'story': STORIES[:40]}), repo / 'train-00000-of-00001.parquet')
    pq.write_table(pa.table({'story': STORIES[40:]}), repo / 'validation-00000-of-00001.parquet')
    out = tmp_path / 'ds'
    meta = convert(source='hub', dataset=str(tmp_path / 'repo'), text_column='story', out_root=str(out),
                   tokenizer=str(tokenizer_dir), seq_len=SEQ_LEN, progress=False)  # fmt: skip
    tok = load_tokenizer(str(tokenizer_dir))
    np.testing.assert_array_equal(read_split(out, 'train'), padded(tok, STORIES[:40]))
    np.testing.assert_array_equal(read_split(out, 'val'), padded(tok, STORIES[40:]))
    assert meta.source == f'hub:{tmp_path / "repo"}'
    with pytest.raises(ValueError, match="has no column 'text'; set --text_column"):
        convert(source='hub', dataset=str(tmp_path / 'repo'), out_root=str(tmp_path / 'x'), progress=False,
                tokenizer=str(tokenizer_dir))  # fmt: skip


def test_val_fraction_carves_a_fixed_disjoint_subset(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    convert_files(tmp_path / 'ds', [src], val_fraction=0.25, tokenizer=str(tokenizer_dir))
    tok = load_tokenizer(str(tokenizer_dir))
    carved = [is_carved(i, 0.25, 17) for i in range(len(STORIES))]
    assert 0 < sum(carved) < len(STORIES)
    val = [s for s, c in zip(STORIES, carved) if c]
    train = [s for s, c in zip(STORIES, carved) if not c]
    np.testing.assert_array_equal(read_split(tmp_path / 'ds', 'val'), padded(tok, val))
    np.testing.assert_array_equal(read_split(tmp_path / 'ds', 'train'), padded(tok, train))
    assert '0.25 carve' in manifest(tmp_path / 'ds', 'val')['source']


def test_bert_vocab_txt_builds_an_uncased_wordpiece_tokenizer(tmp_path):
    words = sorted({w.strip('.,!?"').lower() for s in STORIES for w in s.split()} - {''})
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '.', ',', '!', '?', '"', "'", *words]
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    src = write_text(tmp_path / 'all.txt', ['Lily Was VERY happy.', *STORIES[:10]])
    meta = convert_files(tmp_path / 'ds', [src], val_fraction=0.3, tokenizer=str(tmp_path / 'vocab.txt'))
    assert meta.vocab_size == len(vocab) and (meta.bos_id, meta.eos_id, meta.pad_id) == (2, 3, 0)
    tok = load_tokenizer(str(tmp_path / 'ds' / 'tokenizer'))
    ids = framed(tok, 'Lily Was VERY happy.')
    assert tok.convert_ids_to_tokens(ids) == ['[CLS]', 'lily', 'was', 'very', 'happy', '.', '[SEP]']


def test_packed_layout_and_split_overflow(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    tok = load_tokenizer(str(tokenizer_dir))
    stream = np.concatenate([framed(tok, s) for s in STORIES])
    convert_files(tmp_path / 'packed', [src], val_files=[str(src)], tokenizer=str(tokenizer_dir),
                  layout='packed', overflow='split')  # fmt: skip
    windows = read_split(tmp_path / 'packed', 'train')
    n = len(stream) // SEQ_LEN
    np.testing.assert_array_equal(windows, stream[: n * SEQ_LEN].reshape(n, SEQ_LEN))
    counts = manifest(tmp_path / 'packed', 'train')['counts']
    assert counts['dropped_tail_tokens'] == len(stream) - n * SEQ_LEN and counts['pad_fraction'] == 0

    short = 24  # Most stories are longer than this canvas.
    long_stories = [s for s in STORIES if len(framed(tok, s)) > short]
    convert_files(tmp_path / 'split', [src], val_files=[str(src)], tokenizer=str(tokenizer_dir),
                  seq_len=short, overflow='split')  # fmt: skip
    rows = read_split(tmp_path / 'split', 'train')
    pad = StoryTokens.of(tok).pad
    expected = []
    for story in STORIES:
        ids = framed(tok, story)
        expected += [(ids[i : i + short] + [pad] * short)[:short] for i in range(0, len(ids), short)]
    np.testing.assert_array_equal(rows, np.array(expected))
    counts = manifest(tmp_path / 'split', 'train')['counts']
    assert counts['split_across_examples'] == len(long_stories) > 0 and counts['truncated'] == 0

    convert_files(
        tmp_path / 'trunc', [src], val_files=[str(src)], tokenizer=str(tokenizer_dir), seq_len=short
    )
    np.testing.assert_array_equal(read_split(tmp_path / 'trunc', 'train'), padded(tok, STORIES, short))
    assert manifest(tmp_path / 'trunc', 'train')['counts']['truncated'] == len(long_stories)


def test_bad_stories_are_skipped_and_counted(tmp_path, tokenizer_dir):
    good = STORIES[:5]
    raw = b'\n<|endoftext|>\n'.join(
        [
            good[0].encode(),
            b'',  # empty
            b'   \n\t  ',  # whitespace only
            b'Lily was \xff\xfe happy.',  # invalid UTF-8
            good[1].encode().replace(b' ', b' \x07', 1),  # a control character, removed
            b'x' * 10_000_000,  # a 10 MB story
            *(s.encode() for s in good[2:]),
        ]
    )
    (tmp_path / 'bad.txt').write_bytes(raw)
    (tmp_path / 'bad.jsonl').write_text('{"text": "Tom ran."}\nnot json\n{"other": 1}\n"Sue sat."\n')
    good_file = write_text(tmp_path / 'good.txt', good)
    convert_files(tmp_path / 'ds', [tmp_path / 'bad.txt', tmp_path / 'bad.jsonl'], val_files=[str(good_file)],
                  tokenizer=str(tokenizer_dir), max_story_chars=1_000_000)  # fmt: skip
    counts = manifest(tmp_path / 'ds', 'train')['counts']
    assert counts['skipped'] == {'empty': 2, 'invalid_utf8': 1, 'too_long': 1, 'bad_record': 2}
    assert counts['control_characters_removed'] == 1
    assert counts['stories_read'] == 9 + 4 and counts['stories_kept'] == counts['examples'] == 5 + 2
    tok = load_tokenizer(str(tokenizer_dir))
    kept = read_split(tmp_path / 'ds', 'train')
    np.testing.assert_array_equal(kept, padded(tok, [*good, 'Tom ran.', 'Sue sat.']))  # Control char removed.


@pytest.mark.parametrize(
    ('make', 'message'),
    [
        (lambda d: [str(d / 'missing.txt')], 'missing.txt not found'),
        (lambda d: [str(d / 'nothing-*.txt')], 'matches no files'),
        (lambda d: [str(d)], 'is a directory'),
        (
            lambda d: [str((d / 'model.txt').write_bytes(b'\x7fELF\x00\x00\x01') and d / 'model.txt')],
            'looks binary',
        ),
        (lambda d: [str((d / 'x.csv').write_text('a') and d / 'x.csv')], "unknown extension '.csv'"),
        (lambda d: [str((d / 'x.parquet').write_text('no') and d / 'x.parquet')], 'is not a Parquet file'),
    ],
)
def test_bad_files_are_one_line_errors(make, message, tmp_path, capsys):
    files = make(tmp_path)
    out = tmp_path / 'out'
    argv = ['--source', 'files', '--train_files', *files, '--val_fraction', '0.1', '--train_tokenizer', '64',
            '--out_root', str(out), '--no_progress']  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err and 'Traceback' not in err
    assert not (out / 'cdcd_dataset.json').exists()


def test_missing_text_column_names_the_file(tmp_path, capsys):
    pq.write_table(pa.table({'story': STORIES[:3]}), tmp_path / 'a.parquet')
    argv = ['--source', 'files', '--train_files', str(tmp_path / 'a.parquet'), '--val_fraction', '0.5',
            '--train_tokenizer', '64', '--out_root', str(tmp_path / 'out'), '--no_progress']  # fmt: skip
    assert main(argv) == 2
    assert "a.parquet has no column 'text' (columns: ['story']); set --text_column" in capsys.readouterr().err


def test_existing_dataset_is_kept_unless_overwrite(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    data = lambda: {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.name != '.cdcd-lock'}  # noqa: E731
    before = data()
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))  # Same settings: nothing to do.
    assert data() == before
    with pytest.raises(
        ValueError, match='already holds a dataset made with other settings: pass --overwrite'
    ):
        convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), seq_len=32)
    assert data() == before
    meta = convert_files(
        out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), seq_len=32, overwrite=True
    )
    assert meta.seq_len == 32 and read_split(out, 'train').shape[1] == 32
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == ['.cdcd-lock', '.cdcd-owned']


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_the_same_arguments_make_the_same_bytes_whatever_the_folder_and_workers(tmp_path, caplog):
    """Tokenizer trained offline, metadata, manifests and shards: every byte, in two folders, with
    one and two workers and other batch sizes; a rerun says it has nothing to do."""
    argv = ['--source', 'synthetic', '--num_train', '600', '--num_val', '60', '--train_tokenizer', '500',
            '--seq_len', '64', '--size_limit', '20kb', '--no_progress']  # fmt: skip
    assert main([*argv, '--out_root', str(tmp_path / 'a'), '--num_workers', '1']) == 0
    assert main([*argv, '--out_root', str(tmp_path / 'b'), '--num_workers', '2', '--batch_stories', '7']) == 0
    a, b = tree_bytes(tmp_path / 'a'), tree_bytes(tmp_path / 'b')
    assert len([n for n in a if n.endswith('.mds.zstd')]) > 2 and 'tokenizer/tokenizer.json' in a
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []
    with caplog.at_level('INFO'):
        assert main([*argv, '--out_root', str(tmp_path / 'a')]) == 0
    assert 'already holds this dataset; nothing to do' in caplog.text
    assert tree_bytes(tmp_path / 'a') == a


def test_foreign_shards_are_not_replaced(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    (tmp_path / 'ds' / 'train').mkdir(parents=True)
    (tmp_path / 'ds' / 'train' / 'index.json').write_text('{"shards": [], "version": 2}')
    with pytest.raises(ValueError, match='ds holds files cdcd-composer did not write'):
        convert_files(tmp_path / 'ds', [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    assert (tmp_path / 'ds' / 'train' / 'index.json').read_text() == '{"shards": [], "version": 2}'


def test_ctrl_c_keeps_completed_splits_and_a_rerun_finishes(tmp_path, tokenizer_dir, monkeypatch):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    real = convert_tinystories.split_records

    def interrupted(opt, split):
        for i, record in enumerate(real(opt, split)):
            if split == 'val' and i == 3:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(convert_tinystories, 'split_records', interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_files(
            out, [src], val_files=[str(src)], tokenizer=str(tokenizer_dir), num_workers=0, batch_stories=2
        )
    assert sorted(p.name for p in out.iterdir()) == [
        '.cdcd-lock',
        '.cdcd-owned',
        'tokenizer',
        'train',
    ]  # No val, no staging, no metadata.
    with pytest.raises(ValueError, match='not a complete dataset'):
        DatasetMetadata.load(str(out))
    train_mtime = (out / 'train' / 'manifest.json').stat().st_mtime_ns

    monkeypatch.setattr(convert_tinystories, 'split_records', real)
    meta = convert_files(out, [src], val_files=[str(src)], tokenizer=str(tokenizer_dir))
    assert (out / 'train' / 'manifest.json').stat().st_mtime_ns == train_mtime  # Kept, not redone.
    assert meta.num_examples == {'train': len(STORIES), 'val': len(STORIES)}


@pytest.mark.slow
def test_sigkill_mid_split_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / 'ds'
    cmd = [sys.executable, str(REPO / 'data_prep' / 'convert_tinystories.py'), '--source', 'synthetic',
           '--num_train', '20000', '--num_val', '100', '--seq_len', '64', '--out_root', str(out),
           '--num_workers', '1', '--size_limit', '16kb', '--no_progress']  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob('.tmp-train-*/shard.*'))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, 'the converter finished before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / 'cdcd_dataset.json').exists() and not (out / 'train').exists()
    with pytest.raises(ValueError, match='not a complete dataset'):
        DatasetMetadata.load(str(out))
    trained_tokenizer = (out / 'tokenizer' / 'tokenizer.json').read_bytes()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # The same command again.
    assert DatasetMetadata.load(str(out)).num_examples == {'train': 20000, 'val': 100}
    assert (out / 'tokenizer' / 'tokenizer.json').read_bytes() == trained_tokenizer  # Reused.
    assert not [p for p in out.iterdir() if p.name.startswith('.tmp-')]


def test_corrupt_or_missing_shards_are_named_before_training(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), size_limit='1kb')
    shards = sorted((out / 'train').glob('shard.*.mds.zstd'))
    assert len(shards) > 1
    check_split(str(out), 'train')
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf'shard {shards[1]} is corrupt .*--overwrite'):
        check_split(str(out), 'train')
    shards[1].unlink()
    with pytest.raises(ValueError, match=rf'shard {shards[1]} is missing'):
        check_split(str(out), 'train')


def test_a_corrupt_decompressed_shard_is_named_before_training(tmp_path, tokenizer_dir):
    out = tmp_path / 'ds'
    convert_files(
        out, [write_text(tmp_path / 'all.txt', STORIES)], val_fraction=0.2, tokenizer=str(tokenizer_dir)
    )
    loader = build_dataloader(str(out), 'train', 8, shuffle=False, seed=0, drop_last=False)
    tokens = torch.cat([batch['tokens'] for batch in loader])  # every shard read once
    raw = sorted((out / 'train').glob('shard.*.mds'))  # Streaming decompressed it to read it
    assert raw and tokens.numel() > 0
    data = bytearray(raw[0].read_bytes())
    data[-5] = (data[-5] + 1) % 100  # another token id in range: nothing downstream would notice
    raw[0].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf'shard {raw[0]} is corrupt'):
        check_split(str(out), 'train')


@pytest.mark.slow
def test_write_to_s3_stream_back_and_train(tmp_path, tokenizer_dir, s3_env, tiny_config):
    bucket = s3_env()
    src = write_text(tmp_path / 'all.txt', STORIES)
    uri = f's3://{bucket}/datasets/stories'
    meta = convert(source='files', out_root=uri, train_files=[str(src)], val_fraction=0.2, seq_len=SEQ_LEN,
                   tokenizer=str(tokenizer_dir), size_limit='2kb', progress=False)  # fmt: skip
    convert_files(tmp_path / 'local', [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    assert meta.num_examples == DatasetMetadata.load(str(tmp_path / 'local')).num_examples
    check_split(uri, 'train')
    for split in ('train', 'val'):
        loader = build_dataloader(uri, split, 4, shuffle=False, seed=0, local_cache=str(tmp_path / 'cache'),
                                  drop_last=False)  # fmt: skip
        streamed = np.concatenate([b['tokens'].numpy() for b in loader])
        np.testing.assert_array_equal(streamed, read_split(tmp_path / 'local', split))
    # A second run with the same settings finds the dataset complete; other settings are refused.
    assert convert(source='files', out_root=uri, train_files=[str(src)], val_fraction=0.2, seq_len=SEQ_LEN,
                   tokenizer=str(tokenizer_dir), size_limit='2kb', progress=False) == meta  # fmt: skip
    with pytest.raises(ValueError, match='already holds a dataset'):
        convert(source='files', out_root=uri, train_files=[str(src)], val_fraction=0.3, progress=False,
                tokenizer=str(tokenizer_dir))  # fmt: skip

    # Training reads the same data: metadata and tokenizer fetched, shards streamed into the cache.
    train_cfg = tiny_config | {'data': {'root': uri, 'local_cache': str(tmp_path / 'train-cache')},
                               'max_duration': '2ba', 'eval_interval': '2ba'}  # fmt: skip
    trainer = train_main(train_cfg, return_trainer=True)
    assert int(trainer.state.timestamp.batch) == 2
    assert sorted(os.listdir(tmp_path / 'train-cache')) == ['cdcd_dataset.json', 'tokenizer', 'train', 'val']
    trainer.close()

    import boto3

    s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT_URL'])
    key = next(o['Key'] for o in s3.list_objects_v2(Bucket=bucket)['Contents'] if o['Key'].endswith('.zstd'))
    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(ValueError, match=f'{key.rsplit("/", 1)[-1]} is missing'):
        check_split(uri, key.split('/')[2])


@pytest.mark.slow
def test_unreachable_bucket_is_one_line_error(tmp_path, s3_env, capsys):
    src = write_text(tmp_path / 'all.txt', STORIES[:5])
    argv = ['--source', 'files', '--train_files', str(src), '--val_fraction', '0.5',
            '--train_tokenizer', '64', '--out_root', 's3://no-such-bucket/x', '--no_progress']  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: cannot reach s3://no-such-bucket/x: NoSuchBucket') and '\n' not in err


@pytest.mark.slow
def test_a_second_converter_on_one_bucket_root_is_refused(tmp_path, s3_env, capsys):
    uri = f's3://{s3_env()}/data'
    root = Folder(uri)
    root.claim('--out_root')
    root.write_json(LEASE_FILE, {'id': 'x', 'host': 'another-host', 'pid': 7, 'renewed': time.time()})  # live
    src = write_text(tmp_path / 'all.txt', STORIES[:5])
    argv = ['--source', 'files', '--train_files', str(src), '--val_fraction', '0.5',
            '--train_tokenizer', '64', '--out_root', uri, '--no_progress']  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {uri} is being written by another process (pid 7 on another-host')
    assert '\n' not in err
    assert sorted(root.list_names()) == sorted([LEASE_FILE, '.cdcd-owned'])  # nothing written


# -- never delete what the converter did not write --
@pytest.mark.parametrize('part', ['train', 'val', 'tokenizer'])
@pytest.mark.parametrize('overwrite', [False, True])
def test_the_converter_never_replaces_a_users_folder(tmp_path, tokenizer_dir, part, overwrite):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    (out / part).mkdir(parents=True)
    (out / part / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match=rf'ds holds files cdcd-composer did not write .*found {part}\)'):
        convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), overwrite=overwrite)
    assert (out / part / 'notes.txt').read_text() == 'mine'
    # Inside a root the converter made (marked), a split folder it did not write is still refused.
    (out / '.cdcd-owned').write_text('{}')
    with pytest.raises(ValueError, match=rf'ds/{part} already exists and was not written by this converter'):
        convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), overwrite=overwrite)
    assert (out / part / 'notes.txt').read_text() == 'mine'


@pytest.mark.parametrize('name', ['manifest.json', 'cdcd_dataset.json', 'cdcd_config.json'])
@pytest.mark.parametrize('overwrite', [False, True])
@pytest.mark.parametrize('where', ['ds', 'ds/train'])
def test_a_users_file_named_like_ours_does_not_make_the_folder_ours(
    tmp_path, tokenizer_dir, name, overwrite, where
):
    """Only the `.cdcd-owned` marker says the converter wrote a folder: a user's own manifest.json
    (or any file our formats also use), in the root or in a split, does not."""
    src = write_text(tmp_path / 'all.txt', STORIES)
    (tmp_path / where).mkdir(parents=True)
    (tmp_path / where / name).write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r'ds holds files cdcd-composer did not write'):
        convert_files(
            tmp_path / 'ds', [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), overwrite=overwrite
        )
    assert (tmp_path / where / name).read_text() == '{"mine": true}'
    assert sorted(p.name for p in (tmp_path / where).iterdir()) == [name]


def test_a_users_temporary_folder_survives_a_conversion(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    (out / '.tmp-drafts').mkdir(parents=True)
    (out / '.tmp-drafts' / 'notes.txt').write_text('mine')
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    assert (out / '.tmp-drafts' / 'notes.txt').read_text() == 'mine'
    # A rerun with --overwrite replaces what the converter wrote, and still nothing else.
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir), seq_len=32, overwrite=True)
    assert (out / '.tmp-drafts' / 'notes.txt').read_text() == 'mine'


def test_a_second_conversion_into_the_same_root_fails_fast_naming_the_holder(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    out = tmp_path / 'ds'
    with Folder(str(out)).lock():  # as if another conversion were writing it
        with pytest.raises(StorageError, match=r'ds is being written by another process \(pid \d+, lock'):
            convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    convert_files(out, [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))  # the lock is released


def test_an_out_root_that_is_a_file_is_refused_before_any_work(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'all.txt', STORIES)
    (tmp_path / 'ds').write_text('a file')
    with pytest.raises(ValueError, match='ds is a file, not a directory'):
        convert_files(tmp_path / 'ds', [src], val_fraction=0.2, tokenizer=str(tokenizer_dir))
    assert (tmp_path / 'ds').read_text() == 'a file'


# -- the tokenizer's hash stands in for reproducible WordPiece training --
def test_datasets_record_their_tokenizer_and_readers_check_it(tmp_path, tokenizer_dir, tiny_config):
    out = tmp_path / 'ds'
    meta = convert_files(
        out, [write_text(tmp_path / 'all.txt', STORIES)], val_fraction=0.2, train_tokenizer=300
    )
    digest = tokenizer_sha256(load_tokenizer(str(out / 'tokenizer')))
    assert meta.tokenizer_sha256 == digest
    assert json.loads((out / 'train' / 'manifest.json').read_text())['tokenizer']['sha256'] == digest
    # Another tokenizer dropped into the dataset: training stops before building anything.
    others = write_text(tmp_path / 'others.txt', [story.replace('e', 'i') for story in STORIES])
    other = convert_files(tmp_path / 'other', [others], val_fraction=0.2, train_tokenizer=300)
    assert other.tokenizer_sha256 != digest and other.vocab_size == meta.vocab_size
    shutil.rmtree(out / 'tokenizer')
    shutil.copytree(tmp_path / 'other' / 'tokenizer', out / 'tokenizer')
    cfg = dict(tiny_config, data=dict(tiny_config['data'], root=str(out)), model=dict(tiny_config['model']))
    cfg['model']['vocab_size'] = None
    with pytest.raises(
        ValueError, match='tokenizer/ is not the tokenizer the shards in .* were written with'
    ):
        train_validate(parse_config(cfg))


def test_a_retrained_tokenizer_makes_a_rerun_redo_the_splits(tmp_path):
    out, src = tmp_path / 'ds', write_text(tmp_path / 'all.txt', STORIES)
    convert_files(out, [src], val_fraction=0.2, train_tokenizer=300)
    (out / 'cdcd_dataset.json').unlink()  # an interrupted run: splits complete, no metadata,
    shutil.rmtree(out / 'tokenizer')  # and the tokenizer lost, so the rerun trains it again
    val = out / 'val' / 'manifest.json'  # val written by another tokenizer (another `tokenizers`, say)
    val.write_text(json.dumps({**json.loads(val.read_text()), 'tokenizer': {'sha256': 'another'}}))
    train_shards = {p.name: p.stat().st_mtime_ns for p in (out / 'train').iterdir()}
    meta = convert_files(out, [src], val_fraction=0.2, train_tokenizer=300)
    digest = tokenizer_sha256(load_tokenizer(str(out / 'tokenizer')))
    assert meta.tokenizer_sha256 == digest
    for split in ('train', 'val'):
        assert json.loads((out / split / 'manifest.json').read_text())['tokenizer']['sha256'] == digest
    # train was written with the same ids (training is deterministic) and kept; val was redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'train').iterdir()} == train_shards


def test_stories_all_too_long_say_so_and_name_the_option(tmp_path, tokenizer_dir):
    src = write_text(tmp_path / 'long.txt', ['word ' * 400])
    with pytest.raises(
        ValueError, match=r"split 'train' from .* has no stories .*1 too_long.*raise --max_story_chars"
    ):
        convert_files(
            tmp_path / 'ds', [src], val_files=[str(src)], tokenizer=str(tokenizer_dir), max_story_chars=100
        )


@pytest.mark.parametrize('content', [b'\x00\x01\xff binary', b'just some prose, not a vocabulary\n'])
def test_a_tokenizer_file_that_is_not_a_vocabulary_is_one_line(tmp_path, content, capsys):
    bad = tmp_path / 'vocab.txt'
    bad.write_bytes(content)
    argv = ['--source', 'synthetic', '--num_train', '20', '--num_val', '5',
            '--out_root', str(tmp_path / 'ds'), '--tokenizer', str(bad)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f'--tokenizer {bad} is not a' in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('size, out', [('0', 'must be a size of at least 1kb'), ('lots', 'must be a size')])
def test_a_shard_size_limit_that_is_no_size_is_one_line(tmp_path, size, out, capsys):
    argv = [
        '--source',
        'synthetic',
        '--out_root',
        str(tmp_path / 'ds'),
        '--num_train',
        '10',
        '--num_val',
        '5',
    ]
    assert main([*argv, '--size_limit', size]) == 2
    err = capsys.readouterr().err
    assert f'--size_limit {size!r} {out}' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'ds').exists()


def test_an_out_root_the_system_refuses_is_one_line_naming_the_path(tmp_path, capsys):
    """An OSError at the boundary (here ENOENT under /proc) names the path and what the system said."""
    args = ['--source', 'synthetic', '--num_train', '16', '--num_val', '4', '--train_tokenizer', '64']
    assert main([*args, '--out_root', '/proc/no-such-dir/data', '--no_progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: /proc/no-such-dir: No such file or directory' + (
        ' (check the path, its permissions and the free space)'
    )


def test_rows_without_the_text_column_name_the_files_and_the_column(tmp_path, tokenizer_dir):
    rows = tmp_path / 'rows.jsonl'
    rows.write_text('{"text": "Once upon a time there was a cat."}\n' * 20)
    with pytest.raises(ValueError, match=rf"from {rows} has no stories .*bad_record.*field 'story'"):
        convert_files(
            tmp_path / 'ds', [rows], val_fraction=0.2, tokenizer=str(tokenizer_dir), text_column='story'
        )
