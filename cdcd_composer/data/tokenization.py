"""Tokenizers: load any Hugging Face tokenizer, train an uncased WordPiece one offline, or bytes."""

from __future__ import annotations

import heapq
import logging
import os
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BERT_SPECIAL_TOKENS = {
    'pad_token': '[PAD]',
    'unk_token': '[UNK]',
    'cls_token': '[CLS]',
    'sep_token': '[SEP]',
    'mask_token': '[MASK]',
}


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Trains an uncased BERT-style WordPiece tokenizer, the same one for the same texts every time.

    The vocabulary comes from `wordpiece_vocabulary` (deterministic), not from `tokenizers`'
    `WordPieceTrainer`, whose continuing-subword ids follow hash-map order and so break ties
    between equally frequent merges differently from run to run (huggingface/tokenizers#1794).
    Normalisation, pre-tokenisation and encoding are `tokenizers`' own.

    Args:
        texts: Training texts (consumed once).
        vocab_size: Largest vocabulary, special tokens included; a small corpus may yield fewer.

    Returns:
        A fast tokenizer that adds `[CLS] ... [SEP]` and saves with `save_pretrained`.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    specials = list(BERT_SPECIAL_TOKENS.values())
    vocab = wordpiece_vocabulary(counts, vocab_size, specials)
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token='[UNK]'))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]',
        pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', tok.token_to_id('[CLS]')), ('[SEP]', tok.token_to_id('[SEP]'))],
    )
    log.info('trained a WordPiece tokenizer with %d tokens', tok.get_vocab_size())
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIAL_TOKENS)


def wordpiece_vocabulary(counts: Counter[str], vocab_size: int, specials: list[str]) -> list[str]:
    """A WordPiece vocabulary learnt by merging the most frequent adjacent pieces of `counts`' words.

    As `tokenizers`' trainer: the specials, the characters, the characters continuing a word
    (`##c`), then merges until `vocab_size` tokens (a merge of `a` and `##b` is `ab`). Ties go to
    the lexicographically first pair, and the characters are sorted, so the result is a function
    of the word counts alone. Pair counts are kept up to date per merge (only the words holding
    the merged pair are revisited), with a lazy max-heap.

    Returns:
        The tokens in id order.
    """
    words = [[w[0], *(f'##{c}' for c in w[1:])] for w in counts]
    freq = list(counts.values())
    alphabet = sorted({c for w in counts for c in w})
    continuing = sorted({p for w in words for p in w[1:]})
    vocab = list(dict.fromkeys([*specials, *alphabet, *continuing]))
    known = set(vocab)
    pairs: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = {}
    for i, pieces in enumerate(words):
        for pair in zip(pieces, pieces[1:]):
            pairs[pair] += freq[i]
            holders.setdefault(pair, set()).add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        n, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -n or n == 0:
            continue  # a stale entry: the pair's count changed since it was pushed
        merged = a + b.removeprefix('##')
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(holders.pop((a, b), ())):
            old = words[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for pair in zip(old, old[1:]):
                pairs[pair] -= freq[i]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pairs[pair] += freq[i]
                holders.setdefault(pair, set()).add(i)
                changed.add(pair)
            words[i] = new
        pairs.pop((a, b), None)
        for pair in sorted(changed - {(a, b)}):
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], *pair))
    return vocab


BYTES = 'bytes'  # The name that selects `byte_tokenizer` wherever a tokenizer name is accepted.


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokens for UTF-8: the 5 BERT specials, then one token per byte (id 5 + byte).

    Built with `tokenizers`' byte-level pieces (GPT-2's byte-to-character map) and a BPE model
    without merges, so every byte is one token and decoding returns the exact text.
    """
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode  # loads GPT-2's package

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
    # The Auto and BERT classes import transformers' model code (1 s): only where a tokenizer is loaded.
    from transformers import AutoTokenizer, BertTokenizerFast

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
