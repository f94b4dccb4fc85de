import numpy as np
import pytest

from cdcd_composer.data import DatasetMetadata, StoryDataset, build_dataloader, encode_stories
from cdcd_composer.grammar import StoryGrammar
from cdcd_composer.tokenization import StoryTokens, load_tokenizer
from data_prep.convert_tinystories import convert, main


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


def test_truncation_is_counted(tiny_dataset):
    tok = load_tokenizer(str(tiny_dataset / 'tokenizer'))
    counts = {'examples': 0, 'truncated': 0}
    out = list(encode_stories(['lily was very happy . ' * 10, 'tom was sad .'], tok, 12, counts))
    assert counts == {'examples': 2, 'truncated': 1}
    assert all(isinstance(a, np.ndarray) and a.shape == (12,) for a in out)


def test_converter_refuses_to_overwrite(tiny_dataset, tmp_path):
    before = sorted(p.name for p in tiny_dataset.iterdir())
    with pytest.raises(ValueError, match='already holds a dataset'):
        convert(source='synthetic', out_root=str(tiny_dataset), num_train=4, num_val=4)
    assert sorted(p.name for p in tiny_dataset.iterdir()) == before
    with pytest.raises(SystemExit) as exc:
        main(['--source', 'synthetic', '--out_root', str(tiny_dataset)])
    assert exc.value.code == 2


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='convert_tinystories.py'):
        DatasetMetadata.load(str(tmp_path))
    with pytest.raises(ValueError, match="no 'train' split"):
        build_dataloader(str(tmp_path), 'train', 4, shuffle=False, seed=0)
