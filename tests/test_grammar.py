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
