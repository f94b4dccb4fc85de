"""Tokenizers: load any Hugging Face tokenizer, train an uncased WordPiece one offline, or bytes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

log = logging.getLogger(__name__)

BERT_SPECIAL_TOKENS = {
    'pad_token': '[PAD]',
    'unk_token': '[UNK]',
    'cls_token': '[CLS]',
    'sep_token': '[SEP]',
    'mask_token': '[MASK]',
}


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains an uncased BERT-style WordPiece tokenizer with the `tokenizers` library.

    Args:
        texts: Training texts (consumed once).
        vocab_size: Largest vocabulary, special tokens included; a small corpus may yield fewer.

    Returns:
        A fast tokenizer that adds `[CLS] ... [SEP]` and saves with `save_pretrained`.
    """
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    specials = list(BERT_SPECIAL_TOKENS.values())
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]',
        pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', tok.token_to_id('[CLS]')), ('[SEP]', tok.token_to_id('[SEP]'))],
    )
    log.info('trained a WordPiece tokenizer with %d tokens', tok.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIAL_TOKENS)


BYTES = 'bytes'  # The name that selects `byte_tokenizer` wherever a tokenizer name is accepted.


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokens for UTF-8: the 5 BERT specials, then one token per byte (id 5 + byte).

    Built with `tokenizers`' byte-level pieces (GPT-2's byte-to-character map) and a BPE model
    without merges, so every byte is one token and decoding returns the exact text.
    """
    specials = list(BERT_SPECIAL_TOKENS.values())
    byte_chars = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({byte_chars[b]: len(specials) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]',
        pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', vocab['[CLS]']), ('[SEP]', vocab['[SEP]'])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIAL_TOKENS)


def check_vocab_file(path: str) -> None:
    """A file given as a tokenizer is a BERT `vocab.txt`: UTF-8 text, one token per line, the specials.

    Raises:
        ValueError: one line naming the file and what it lacks.
    """
    try:
        with open(path, encoding='utf-8') as f:
            tokens = {line.rstrip('\n') for line in f}
    except UnicodeDecodeError:
        raise ValueError(f'--tokenizer {path} is not a vocab.txt (not UTF-8 text)') from None
    missing = [t for t in BERT_SPECIAL_TOKENS.values() if t not in tokens]
    if missing:
        raise ValueError(
            f'--tokenizer {path} is not a BERT vocab.txt (no {", ".join(missing)} lines); give a vocab.txt, '
            'a tokenizer directory or a hub name'
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Loads a fast tokenizer by hub name, local directory, or BERT `vocab.txt` file.

    A `vocab.txt` file builds an uncased BERT WordPiece tokenizer (bert-base-uncased's
    vocabulary file reproduces its ids exactly).

    Raises:
        ValueError: it cannot be loaded, or has no fast (Rust) implementation.
    """
    if name_or_path == BYTES:
        return byte_tokenizer()
    if os.path.isfile(name_or_path):
        check_vocab_file(name_or_path)
    try:
        if os.path.isfile(name_or_path):
            tokenizer = BertTokenizerFast(vocab_file=name_or_path, do_lower_case=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f'cannot load tokenizer {name_or_path!r}: give a hub name reachable from this machine, a '
            f'local tokenizer directory or a BERT vocab.txt ({type(e).__name__}: {str(e)[:120]})'
        ) from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f'tokenizer {name_or_path!r} has no fast (Rust) version; choose another tokenizer')
    return tokenizer


def tokenizer_to_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    """A JSON-safe description that rebuilds the exact tokenizer (see `tokenizer_from_json`)."""
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f'tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer; use a *Fast one')
    return {
        'tokenizer': tokenizer.backend_tokenizer.to_str(),
        'special_tokens': {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    }


def tokenizer_from_json(blob: dict) -> PreTrainedTokenizerFast:
    """Inverse of `tokenizer_to_json`."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(blob['tokenizer']), **blob['special_tokens']
    )
