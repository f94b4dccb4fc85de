"""Counts and statistics of one converted split, summarised into its `manifest.json`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from cdcd_composer.data.encoding import EncodedChunk

TOP_TOKENS = 20


class SplitStats:
    """Accumulates `EncodedChunk` counts, story lengths and token frequencies.

    Args:
        vocab_size: Size of the token-frequency histogram.
    """

    def __init__(self, vocab_size: int):
        self.counts: Counter = Counter()
        self.lengths: list[np.ndarray] = []
        self.token_counts = np.zeros(vocab_size, np.int64)

    def add(self, chunk: EncodedChunk) -> None:
        """Adds one encoded batch."""
        self.counts.update(chunk.counts)
        self.lengths.append(chunk.lengths)
        n = len(chunk.token_counts)
        if n > len(self.token_counts):  # Ids beyond the nominal vocabulary (added tokens).
            self.token_counts = np.pad(self.token_counts, (0, n - len(self.token_counts)))
        self.token_counts[:n] += chunk.token_counts

    @property
    def stories_read(self) -> int:
        """Records read from the source, skipped ones included."""
        return self.counts['stories']

    def summary(
        self, *, examples: int, seq_len: int, dropped_tail_tokens: int, id_to_token, unk_id: int | None
    ) -> dict:
        """The `counts`, `story_tokens` and `token_histogram` sections of the manifest.

        Args:
            examples: Examples written.
            seq_len: Canvas length.
            dropped_tail_tokens: Packed layout: tokens after the last full window.
            id_to_token: Callable id -> token string, for the most frequent tokens.
            unk_id: The unknown token's id, if any.
        """
        c = self.counts
        skipped = {k.removeprefix('skipped_'): v for k, v in sorted(c.items()) if k.startswith('skipped_')}
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        total = int(self.token_counts.sum())
        top = np.argsort(-self.token_counts, kind='stable')[:TOP_TOKENS]
        counts = {
            'stories_read': c['stories'],
            'stories_kept': int(len(lengths)),
            'skipped': skipped,
            'control_characters_removed': c['cleaned'],
            'truncated': c['truncated'],
            'split_across_examples': c['split'],
            'examples': examples,
            'tokens_kept': c['tokens'],
            'dropped_tail_tokens': dropped_tail_tokens,
            'canvas_tokens': examples * seq_len,
            'pad_fraction': round(1 - (c['tokens'] - dropped_tail_tokens) / max(examples * seq_len, 1), 4),
        }
        story_tokens = {'framing_included': True}
        if len(lengths):
            q = np.percentile(lengths, [50, 90, 99])
            story_tokens |= {
                'min': int(lengths.min()),
                'mean': round(float(lengths.mean()), 1),
                'p50': round(float(q[0]), 1),
                'p90': round(float(q[1]), 1),
                'p99': round(float(q[2]), 1),
                'max': int(lengths.max()),
                'longer_than_canvas': round(float((lengths > seq_len).mean()), 4),
            }
        histogram = {
            'distinct_ids': int((self.token_counts > 0).sum()),
            'unk_fraction': round(float(self.token_counts[unk_id]) / max(total, 1), 6)
            if unk_id is not None
            else None,
            'top_fractions': {
                id_to_token(int(i)): round(float(self.token_counts[i]) / max(total, 1), 5)
                for i in top
                if self.token_counts[i]
            },
        }
        return {'counts': counts, 'story_tokens': story_tokens, 'token_histogram': histogram}
