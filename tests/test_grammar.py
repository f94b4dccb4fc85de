import collections
import math

import pytest

from cdcd_composer.data import grammar


def test_generator_is_deterministic_by_seed():
    a = list(grammar.StoryGrammar(seed=3).stories(5))
    b = list(grammar.StoryGrammar(seed=3).stories(5))
    c = list(grammar.StoryGrammar(seed=4).stories(5))
    assert a == b
    assert a != c


def test_every_generated_sentence_is_recognised():
    stories = list(grammar.StoryGrammar(seed=0).stories(300))
    sentences = [s for story in stories for s in grammar.split_sentences(story)]
    assert len(sentences) > 1500
    assert all(grammar.recognise(s) for s in sentences)
    assert grammar.recognised_fraction(stories) == 1.0


def test_every_pattern_is_generated_and_recognised():
    g = grammar.StoryGrammar(seed=1)
    for name in grammar.PATTERNS:
        for _ in range(20):
            assert grammar.recognise(g.sentence(name)), name


def test_recogniser_rejects_what_the_grammar_cannot_derive():
    assert grammar.recognise('One day, Lily went to the park.')
    assert grammar.recognise('one day , lily went to the park .')  # spacing and case are ignored
    assert not grammar.recognise('one day , lily went to the moon .')  # unknown place
    assert not grammar.recognise('one day , lily went to the park')  # no end mark
    assert not grammar.recognise('lily went one day to the park .')  # word order
    assert not grammar.recognise('one day , lily lily went to the park .')  # repetition
    assert not grammar.recognise('she saw a ball ball under the tree .')
    assert grammar.recognise('she saw a ball under the tree .')  # optional adjectives omitted
    assert grammar.recognise('she saw a big red ball under the tree .')
    assert not grammar.recognise('she saw a red big ball under the tree .')  # size before colour


def test_fraction_counts_truncated_fragments_as_unrecognised():
    text = 'Lily was very happy. Tom was very'
    assert grammar.split_sentences(text) == [['lily', 'was', 'very', 'happy', '.'], ['tom', 'was', 'very']]
    assert grammar.recognised_fraction([text]) == 0.5
    assert grammar.recognised_fraction(['']) == 0.0


def test_vocabulary_is_a_few_hundred_words():
    assert 200 <= len(grammar.vocabulary()) <= 600


def reduced_grammar(monkeypatch):
    """A grammar small enough that sampling frequencies pin down each story's probability."""
    from cdcd_composer.data import grammar

    categories = {**grammar.CATEGORIES, 'NAME': ('lily', 'tom', 'mia'), 'TRAIT': ('kind', 'shy'),
                  'CREATURE': ('dog',), 'COLOR': ('red', 'blue'), 'OBJECT': ('ball', 'kite'),
                  'FEELING': ('happy', 'sad'), 'VERB': ('hold',), 'PLACE': ('park',),
                  'FAMILY': ('mom',)}  # fmt: skip
    patterns = {
        name: grammar.PATTERNS[name]
        for name in ('opening', 'home', 'want', 'state', 'play', 'ending', 'the_end')
    }
    monkeypatch.setattr(grammar, 'CATEGORIES', categories)
    monkeypatch.setattr(grammar, 'PATTERNS', patterns)
    monkeypatch.setattr(grammar, '_PARSED', {n: grammar._parse_pattern(p) for n, p in patterns.items()})
    phrases = {cat: tuple(tuple(grammar.words(p)) for p in ps) for cat, ps in categories.items()}
    phrases['SUBJECT'] = phrases['NAME'] + phrases['PRONOUN']
    monkeypatch.setattr(grammar, '_SLOT_PHRASES', phrases)
    monkeypatch.setattr(grammar, '_MIDDLE_PATTERNS', ('want', 'state', 'play'))
    grammar.sentence_probability.cache_clear()
    return grammar


def test_exact_story_probabilities_match_sampling_frequencies(monkeypatch):
    grammar = reduced_grammar(monkeypatch)
    try:
        n = 60000
        counts = collections.Counter(grammar.StoryGrammar(seed=3, min_middle=1, max_middle=2).stories(n))
        exact = {story: math.exp(grammar.story_log_probability(story, 1, 2)) for story in counts}
        assert sum(exact.values()) <= 1.0 + 1e-9  # the stories drawn cannot hold more than all the mass
        for story, count in counts.most_common(40):  # each within 4 standard errors of its frequency
            p = exact[story]
            assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n), story
        # Normalisation: the mass of the stories seen is all but what was never drawn, which
        # Good-Turing estimates as the share of stories drawn exactly once.
        once = sum(1 for c in counts.values() if c == 1)
        assert sum(exact.values()) == pytest.approx(1 - once / n, abs=0.005)
    finally:
        grammar.sentence_probability.cache_clear()


def test_every_generated_story_has_a_probability_and_a_filled_pattern_sums_to_one():
    from cdcd_composer.data.grammar import (
        CATEGORIES,
        StoryGrammar,
        sentence_probability,
        story_log_probability,
        words,
    )

    assert all(math.isfinite(story_log_probability(s)) for s in StoryGrammar(seed=11).stories(200))
    assert story_log_probability('Once upon a time, there was a dog.') == -math.inf
    cast = ('lily', 'tom', 1)
    fills = [f'{subject} was very {feeling} .' for subject in ('lily', 'she', 'he', 'tom')
             for feeling in CATEGORIES['FEELING']]  # fmt: skip
    assert sum(sentence_probability('state', tuple(words(f)), cast) for f in fills) == pytest.approx(1.0)
