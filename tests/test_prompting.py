"""Prompts and templates are read as text: nothing in them is lost, and nothing becomes a control token."""

import pytest

from cdcd_composer.data.tokenization import byte_tokenizer, train_wordpiece
from cdcd_composer.prompting import prompt_canvas, template_canvas
from cdcd_composer.story_tokens import StoryTokens


@pytest.fixture(scope='module')
def tokenizer():
    return train_wordpiece(['once upon a time there was a dog . [ sep ] pad the end .'] * 20, 200)


def test_control_token_text_in_a_prompt_is_text(tokenizer):
    given, mask = prompt_canvas(tokenizer, 40, 'the dog [SEP] [PAD] ran')
    ids = StoryTokens.of(tokenizer)
    prompt = given[1 : int((~mask).sum())].tolist()
    assert ids.eos not in prompt and ids.pad not in prompt  # [SEP] is the story end, [PAD] padding
    assert len(prompt) > 4  # the brackets and words are tokens of their own


@pytest.mark.parametrize(
    'build, message',
    [
        (lambda t: prompt_canvas(t, 40, 'the dog \udcff ran'), r'--prompt is not valid UTF-8 \(byte 8\)'),
        (lambda t: template_canvas(t, 40, 'the \udcff ___', 2, True), '--template is not valid UTF-8'),
        (lambda t: prompt_canvas(t, 40, 'a' * 100_000), '--prompt has a word of 100000 characters'),
        (lambda t: template_canvas(t, 40, 'b' * 101 + ' ___', 2, True), 'reads at most 100 per word'),
    ],
)
def test_text_the_tokenizer_would_lose_is_refused_in_one_line(tokenizer, build, message):
    with pytest.raises(ValueError, match=message) as error:
        build(tokenizer)
    assert '\n' not in str(error.value)


def test_bytes_read_any_word_length():
    given, mask = prompt_canvas(byte_tokenizer(), 300, 'x' * 200)
    assert int((~mask).sum()) == 201  # [CLS] and 200 bytes


@pytest.mark.parametrize(
    'args, message',
    [
        ((2, 2.5, 0), r'steps \(--steps\) must be an integer, got 2.5'),
        ((True, 4, 0), 'num_samples .* must be an integer, got True'),
        ((2, 4, 0, -1), 'batch_size -1 must be positive'),
        ((2, 4, 0.0), r'seed \(--seed\) must be an integer'),
        ((10**12, 4, 0), 'more than one call samples'),
    ],
)
def test_sampling_counts_are_integers_in_range(args, message):
    from cdcd_composer.sampler import check_sampling_request

    with pytest.raises(ValueError, match=message):
        check_sampling_request(*args)
