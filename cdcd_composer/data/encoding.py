"""Stories to canvases: clean, tokenize in batches, lay out as fixed-length examples.

This module runs inside the converter's worker processes, so it imports only numpy and
`tokenizers` (a worker starts in well under a second). A worker gets the tokenizer as its JSON
serialisation and encodes with the Rust backend directly, which gives exactly the ids of the
Hugging Face fast tokenizer called with `add_special_tokens=False`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from cdcd_composer.data.options import LAYOUTS, OVERFLOWS  # noqa: F401 (importers)
from cdcd_composer.data.sources import Record, Skipped

# C0/C1 control characters except tab, newline and carriage return.
CONTROL_CHARACTERS = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]')


@dataclass(frozen=True)
class CanvasSpec:
    """How stories become examples.

    Attributes:
        seq_len: Tokens per example (the canvas), framing tokens included.
        layout: 'padded': one story per example, `[bos] story [eos] [pad]...` (pads are targets);
            'packed': `[bos] story [eos]` streams concatenated and cut into full windows.
        overflow: A story longer than the canvas is cut to it ('truncate') or continued in the
            next example(s) ('split').
        bos, eos, pad: Framing and padding token ids.
        max_story_chars: Longer stories are skipped as 'too_long' before tokenization.
        dtype: numpy dtype of the stored tokens ('uint16' when the vocabulary fits).
    """

    seq_len: int
    layout: str
    overflow: str
    bos: int
    eos: int
    pad: int
    max_story_chars: int
    dtype: str


@dataclass
class EncodedChunk:
    """The result of encoding one batch of records.

    Attributes:
        examples: (n, seq_len) complete examples ('padded' layout; empty for 'packed').
        stream: (m,) the batch's token stream ('packed' layout; cut into windows by the writer).
        counts: 'stories' (read), 'examples', 'tokens' (story tokens kept, framing included),
            'truncated', 'split', 'cleaned' (control characters removed), 'skipped_<reason>'.
        lengths: (stories,) tokens per story before any cut, framing included.
        token_counts: (vocab,) occurrences of each id among the kept story tokens.
    """

    examples: np.ndarray
    stream: np.ndarray
    counts: Counter = field(default_factory=Counter)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    token_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def clean_story(record: Record, max_chars: int) -> tuple[str | None, str]:
    """(text, what happened): text is None when skipped, and the second item says why.

    What happened is '' (kept as is), 'cleaned' (control characters removed) or a skip reason:
    'bad_record', 'invalid_utf8', 'too_long', 'empty'.
    """
    if isinstance(record, Skipped):
        return None, record.reason
    if isinstance(record, bytes):
        if len(record) > 4 * max_chars:
            return None, 'too_long'
        try:
            record = record.decode('utf-8')
        except UnicodeDecodeError:
            return None, 'invalid_utf8'
    if len(record) > max_chars:
        return None, 'too_long'
    text, n_control = CONTROL_CHARACTERS.subn('', record)
    text = text.strip()
    if not text:
        return None, 'empty'
    return text, 'cleaned' if n_control else ''


class StoryEncoder:
    """Encodes batches of records into canvases (see `CanvasSpec`)."""

    def __init__(self, tokenizer_json: str, spec: CanvasSpec):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()  # As a Hugging Face tokenizer called without truncation=.
        self.tokenizer.no_padding()
        self.spec = spec
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, records: Sequence[Record]) -> EncodedChunk:
        """Cleans, tokenizes (one batched call) and lays out `records`."""
        spec, counts = self.spec, Counter(stories=len(records))
        texts = []
        for record in records:
            text, what = clean_story(record, spec.max_story_chars)
            if text is None:
                counts[f'skipped_{what}'] += 1
                continue
            counts[what] += bool(what)
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        stories = [np.array([spec.bos, *e.ids, spec.eos], dtype=spec.dtype) for e in encodings]
        lengths = np.array([len(s) for s in stories], dtype=np.int32)
        if spec.overflow == 'truncate':
            counts['truncated'] += int((lengths > spec.seq_len).sum())
            stories = [s[: spec.seq_len] for s in stories]
        else:
            counts['split'] += int((lengths > spec.seq_len).sum())
        stream = np.concatenate(stories) if stories else np.zeros(0, spec.dtype)
        counts['tokens'] += len(stream)
        token_counts = np.bincount(stream, minlength=self.vocab_size).astype(np.int64)
        if spec.layout == 'packed':
            examples = np.zeros((0, spec.seq_len), spec.dtype)
        else:
            examples = self._pad(stories)
            stream = np.zeros(0, spec.dtype)
        counts['examples'] += len(examples)
        return EncodedChunk(examples, stream, counts, lengths, token_counts)

    def _pad(self, stories: list[np.ndarray]) -> np.ndarray:
        """One story per example; a story longer than the canvas continues in the next rows."""
        seq_len = self.spec.seq_len
        rows = sum(-(-len(s) // seq_len) for s in stories)
        examples = np.full((rows, seq_len), self.spec.pad, dtype=self.spec.dtype)
        row = 0
        for story in stories:
            for start in range(0, len(story), seq_len):
                piece = story[start : start + seq_len]
                examples[row, : len(piece)] = piece
                row += 1
        return examples


_WORKER_ENCODER: StoryEncoder | None = None


def init_worker(tokenizer_json: str, spec: CanvasSpec) -> None:
    """Process-pool initializer: builds this worker's encoder once."""
    global _WORKER_ENCODER
    # Handlers inherited from the parent (Composer, Streaming) must not keep a worker alive:
    # SIGTERM from `Pool.terminate` ends it, and Ctrl-C is the parent's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = StoryEncoder(tokenizer_json, spec)


def encode_in_worker(records: Sequence[Record]) -> EncodedChunk:
    """Process-pool task: encodes one batch with the worker's encoder."""
    assert _WORKER_ENCODER is not None, 'init_worker was not called'
    return _WORKER_ENCODER.encode(records)


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Consecutive lists of `size` records (the last may be shorter)."""
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def encode_all(
    records: Iterable[Record], tokenizer_json: str, spec: CanvasSpec, num_workers: int, batch_stories: int
) -> Iterator[EncodedChunk]:
    """Encodes `records` in batches, in order, across `num_workers` processes (0: in-process).

    Records are read from the source in this process, and at most `2 * num_workers` batches
    are in flight, so memory stays bounded however large the source is. Each worker encodes
    single-threaded; together they use `num_workers` cores.
    """
    if num_workers == 0:
        encoder = StoryEncoder(tokenizer_json, spec)
        yield from map(encoder.encode, batched(records, batch_stories))
        return
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # One thread per worker; inherited on fork.
    # fork: a worker starts in milliseconds and imports nothing (spawn would re-import torch).
    pool = multiprocessing.get_context('fork').Pool(num_workers, init_worker, (tokenizer_json, spec))
    try:
        in_flight: deque = deque()
        for batch in batched(records, batch_stories):
            in_flight.append(pool.apply_async(encode_in_worker, (batch,)))
            if len(in_flight) >= 2 * num_workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
        pool.close()
    except BaseException:  # Ctrl-C, an error, or the consumer stopped early: stop the workers now.
        pool.terminate()
        raise
    finally:
        pool.join()
