import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from streaming.base.hashing import get_hash

from cdcd_composer.data.grammar import StoryGrammar
from cdcd_composer.data.loaders import StoryDataset, build_dataloader, check_split, decompress_local_split
from cdcd_composer.data.metadata import DatasetMetadata
from cdcd_composer.data.tokenization import load_tokenizer
from cdcd_composer.story_tokens import StoryTokens


def test_mds_round_trip_equals_the_tokenizer(tiny_dataset):
    meta = DatasetMetadata.load(str(tiny_dataset))
    assert meta.num_examples == {'train': 256, 'val': 64}
    assert meta.layout == 'padded'
    tok = load_tokenizer(str(tiny_dataset / 'tokenizer'))
    assert len(tok) == meta.vocab_size
    ids = StoryTokens.of(tok)
    assert (ids.bos, ids.eos, ids.pad) == (meta.bos_id, meta.eos_id, meta.pad_id)

    # The converter's synthetic stream is reproducible: regenerate it and compare every example.
    stories = list(StoryGrammar(seed=17).stories(256))
    dataset = StoryDataset(local=str(tiny_dataset / 'train'), shuffle=False, batch_size=1)
    assert len(dataset) == 256
    for i in (0, 1, 100, 255):
        tokens = dataset[i]['tokens']
        assert tokens.dtype.is_floating_point is False and tokens.shape == (meta.seq_len,)
        expected = [ids.bos, *tok(stories[i], add_special_tokens=False)['input_ids'], ids.eos]
        assert tokens[: len(expected)].tolist() == expected
        assert (tokens[len(expected) :] == ids.pad).all()
        decoded = tok.decode(tokens.tolist(), skip_special_tokens=True)
        assert decoded.split() == tok.decode(tok(stories[i])['input_ids'], skip_special_tokens=True).split()


def test_dataloader_yields_long_batches(tiny_dataset):
    loader = build_dataloader(str(tiny_dataset), 'val', 16, shuffle=True, seed=1)
    batch = next(iter(loader))
    assert batch['tokens'].shape == (16, 96)
    assert str(batch['tokens'].dtype) == 'torch.int64'


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='convert_tinystories.py'):
        DatasetMetadata.load(str(tmp_path))
    with pytest.raises(ValueError, match="no 'train' split"):
        check_split(str(tmp_path), 'train')


def test_local_shards_are_decompressed_whole_by_any_number_of_writers(tiny_dataset, tmp_path):
    """Nodes sharing a dataset's filesystem each decompress its shards; a rename makes each write whole."""
    split = tmp_path / 'train'
    shutil.copytree(tiny_dataset / 'train', split)
    for raw in split.glob('*.mds'):
        raw.unlink()  # as the converter leaves them: only the .zstd
    with ThreadPoolExecutor(4) as pool:  # four writers at once, as four nodes would
        list(pool.map(decompress_local_split, [str(split)] * 4))
    index = json.loads((split / 'index.json').read_text())
    for shard in index['shards']:
        raw = split / shard['raw_data']['basename']
        assert get_hash('xxh64', raw.read_bytes()) == shard['raw_data']['hashes']['xxh64']
        assert raw.stat().st_mode == (split / shard['zip_data']['basename']).stat().st_mode
    assert not list(split.glob('*.tmp'))
    check_split(str(tmp_path), 'train')  # both forms verified against index.json


def test_shared_memory_clean_up_removes_only_this_runs_stale_registrations(tmp_path, monkeypatch):
    """A killed run's registration of our cache goes; another job's live one, on other dirs, stays."""
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _pack_locals

    from cdcd_composer import workarounds
    from cdcd_composer.data import loaders

    monkeypatch.setenv(workarounds.SHM_NAMESPACE_ENV, f'test{os.getpid()}')
    workarounds.streaming_node_namespace()
    name = loaders.streaming_prefix._get_path
    cache, other = tmp_path / 'cache', tmp_path / 'other-job'
    blocks = []
    for prefix_int, dirs in ((0, [str(other / 'train')]), (1, [str(cache / 'train'), str(cache / 'val')])):
        data = _pack_locals(dirs, prefix_int)
        block = SharedMemory(name(prefix_int, 'locals'), True, len(data), auto_cleanup=False)
        block.buf[: len(data)] = data
        blocks.append(block)
    try:
        assert name(0, 'locals').startswith(f'test{os.getpid()}_')
        loaders.clean_shared_memory('s3://bucket/data', str(cache), ('train', 'val'))
        assert os.path.exists(f'/dev/shm/{name(0, "locals")}')  # the other job's: untouched
        assert not os.path.exists(f'/dev/shm/{name(1, "locals")}')  # our killed run's: removed
        loaders.clean_shared_memory(str(tmp_path), None, ('train', 'val'))  # a local root: nothing to do
        assert os.path.exists(f'/dev/shm/{name(0, "locals")}')
    finally:
        for block in blocks:
            block.shm.close()
        SharedMemory(name(0, 'locals'), False, auto_cleanup=False).shm.unlink()
        monkeypatch.undo()  # the namespace as it was (a test worker's own, or node0) ...
        workarounds.streaming_node_namespace()  # ... for the tests that follow


@pytest.mark.parametrize('index, message', [
    ('[1, 2]', 'is not an MDS index (no list of shards)'),
    ('{"version": 2}', 'is not an MDS index (no list of shards)'),
    ('{"shards": [{"column_names": ["tokens"]}]}', 'shard 0 lacks raw_data/zip_data with a basename'),
    ('{"shards": [{"raw_data": {"basename": "x.mds"}}]}', 'shard 0 lacks raw_data/zip_data'),
    ('not json', 'cannot be read'),
    (b'\xff\xfe', 'cannot be read'),
])  # fmt: skip
def test_a_malformed_index_is_one_line_naming_the_file(tiny_dataset, tmp_path, index, message):
    shutil.copytree(tiny_dataset / 'train', tmp_path / 'train')
    path = tmp_path / 'train' / 'index.json'
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(ValueError) as exc:
        check_split(str(tmp_path), 'train')
    assert str(path) in str(exc.value) and message in str(exc.value) and '--overwrite' in str(exc.value)
    assert '\n' not in str(exc.value)


@pytest.mark.parametrize('change, message', [
    (lambda m: m.pop('seq_len'), "lacks the key 'seq_len'"),
    (lambda m: m.update(vocab_size='many'), "vocab_size='many' is not a int"),
    (lambda m: m.update(pad_id=10**6), 'pad_id=1000000 is outside the vocabulary'),
    (lambda m: m.update(seq_len=0), 'must be positive'),
])  # fmt: skip
def test_a_damaged_dataset_description_is_one_line_naming_the_key(tiny_dataset, tmp_path, change, message):
    import json

    from cdcd_composer.data.metadata import DatasetMetadata

    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    blob = json.loads((root / 'cdcd_dataset.json').read_text())
    change(blob)
    (root / 'cdcd_dataset.json').write_text(json.dumps(blob))
    with pytest.raises(ValueError) as exc:
        DatasetMetadata.load(str(root))
    assert (
        'cdcd_dataset.json: ' in str(exc.value) and message in str(exc.value) and '\n' not in str(exc.value)
    )
    (root / 'cdcd_dataset.json').write_text('[1]')
    with pytest.raises(ValueError, match='holds no mapping of keys'):
        DatasetMetadata.load(str(root))


def test_a_description_that_states_another_seq_len_than_the_shards_is_refused(
    tiny_dataset, tiny_config, tmp_path
):
    import json

    from cdcd_composer.commands.train import validate
    from cdcd_composer.config import parse_config

    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    blob = json.loads((root / 'cdcd_dataset.json').read_text())
    (root / 'cdcd_dataset.json').write_text(json.dumps(blob | {'seq_len': blob['seq_len'] // 2}))
    cfg = dict(tiny_config, data=dict(tiny_config['data'], root=str(root)))
    with pytest.raises(ValueError) as exc:
        validate(parse_config(cfg))
    message = str(exc.value)
    encoding = f'ndarray:{blob["token_dtype"]}:{blob["seq_len"]}'
    assert f'holds examples encoded as {encoding}, but cdcd_dataset.json says' in message
    assert '\n' not in message


def test_a_description_that_states_another_vocabulary_than_its_tokenizer_is_refused(
    tiny_dataset, tiny_config, tmp_path
):
    """A smaller vocab_size would build an embedding table the shards' ids overflow (an IndexError
    mid-training before); it is one line naming the file before anything is built."""
    import json

    from cdcd_composer.commands.train import validate
    from cdcd_composer.config import parse_config

    root = tmp_path / 'ds'
    shutil.copytree(tiny_dataset, root)
    blob = json.loads((root / 'cdcd_dataset.json').read_text())
    (root / 'cdcd_dataset.json').write_text(json.dumps(blob | {'vocab_size': 7}))
    cfg = dict(tiny_config, data=dict(tiny_config['data'], root=str(root)))
    with pytest.raises(
        ValueError, match=rf'{root}/cdcd_dataset.json says vocab_size 7, but tokenizer/ has 512'
    ):
        validate(parse_config(cfg))
