"""A small probabilistic grammar of children's stories: an offline corpus and an exact recogniser."""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Iterator, Sequence

# Word categories. Every terminal of the grammar lives in one of these lists, so the
# recogniser knows exactly which words may fill which slot.
CATEGORIES: dict[str, tuple[str, ...]] = {
    'NAME': (
        'lily',
        'tom',
        'mia',
        'ben',
        'sue',
        'max',
        'anna',
        'sam',
        'lucy',
        'jack',
        'emma',
        'tim',
        'zoe',
        'leo',
        'ella',
        'finn',
        'rosa',
        'noah',
        'ivy',
        'omar',
        'kim',
        'ted',
        'amy',
        'joe',
        'nina',
        'bob',
        'lola',
        'dan',
        'ruby',
        'eli',
    ),
    'CREATURE': (
        'girl',
        'boy',
        'dog',
        'cat',
        'bunny',
        'bird',
        'bear',
        'fox',
        'frog',
        'duck',
        'mouse',
        'puppy',
        'kitten',
        'lion',
        'owl',
        'pig',
        'horse',
        'fish',
        'turtle',
        'squirrel',
    ),
    'TRAIT': (
        'little',
        'small',
        'kind',
        'brave',
        'shy',
        'happy',
        'curious',
        'friendly',
        'silly',
        'clever',
        'gentle',
        'tiny',
        'young',
        'funny',
        'quiet',
        'playful',
    ),
    'COLOR': ('red', 'blue', 'green', 'yellow', 'pink', 'purple', 'orange', 'brown', 'white', 'black'),
    'SIZE': ('big', 'small', 'tiny', 'huge', 'soft', 'shiny', 'old', 'new', 'pretty', 'round'),
    'OBJECT': (
        'ball',
        'kite',
        'box',
        'hat',
        'book',
        'doll',
        'car',
        'boat',
        'apple',
        'cake',
        'toy',
        'flower',
        'rock',
        'stick',
        'shell',
        'cup',
        'drum',
        'bell',
        'key',
        'star',
        'sock',
        'spoon',
        'balloon',
        'blanket',
        'truck',
        'train',
        'crayon',
        'leaf',
        'feather',
        'button',
        'cookie',
        'map',
        'basket',
        'ribbon',
        'shoe',
        'coin',
        'jar',
        'sandwich',
        'bucket',
        'puzzle',
    ),
    'PLACE': (
        'park',
        'garden',
        'forest',
        'beach',
        'school',
        'house',
        'farm',
        'lake',
        'hill',
        'river',
        'zoo',
        'store',
        'yard',
        'meadow',
        'library',
        'kitchen',
        'pond',
        'castle',
        'village',
        'playground',
        'field',
        'cave',
        'barn',
        'street',
    ),
    'LANDMARK': ('tree', 'bench', 'fence', 'door', 'window', 'bridge', 'wall', 'gate', 'bush', 'table'),
    'FEELING': (
        'happy',
        'sad',
        'scared',
        'excited',
        'proud',
        'tired',
        'angry',
        'surprised',
        'calm',
        'glad',
        'worried',
        'sleepy',
        'lonely',
        'hungry',
        'grumpy',
        'thankful',
    ),
    'ACTION': (
        'play',
        'run',
        'jump',
        'sing',
        'dance',
        'swim',
        'read',
        'draw',
        'hide',
        'climb',
        'laugh',
        'rest',
        'skip',
        'paint',
        'explore',
        'dig',
        'build',
        'cook',
        'help',
        'clap',
    ),
    'VERB': (
        'find',
        'share',
        'fix',
        'hold',
        'carry',
        'throw',
        'catch',
        'keep',
        'hug',
        'clean',
        'open',
        'wash',
        'push',
        'pull',
        'show',
        'paint',
        'count',
        'lift',
        'hide',
        'bring',
    ),
    'FAMILY': ('mom', 'dad', 'grandma', 'grandpa', 'sister', 'brother', 'aunt', 'uncle', 'friend', 'teacher'),
    'WEATHER': ('sunny', 'rainy', 'windy', 'cold', 'warm', 'snowy', 'cloudy', 'bright'),
    'TIME': ('one day', 'one morning', 'after lunch', 'that night', 'the next day', 'later', 'soon'),
    'PRONOUN': ('he', 'she', 'they'),
    'POSSESSIVE': ('his', 'her', 'their'),
    'SAID': ('said', 'asked', 'shouted', 'whispered', 'laughed', 'cried'),
}

# Sentence patterns. UPPER-CASE items name a category, `SUBJECT` is a name or pronoun,
# `[A B]` marks an optional run of items, everything else is a literal word or mark.
PATTERNS: dict[str, str] = {
    'opening': 'once upon a time , there was a TRAIT CREATURE named NAME .',
    'home': 'NAME lived near the PLACE with POSSESSIVE FAMILY .',
    'outing': 'TIME , SUBJECT went to the PLACE .',
    'discovery': 'SUBJECT saw a [SIZE] [COLOR] OBJECT under the LANDMARK .',
    'want': 'SUBJECT wanted to VERB the [COLOR] OBJECT .',
    'feeling': 'SUBJECT felt FEELING because the OBJECT was SIZE .',
    'play': 'NAME and NAME liked to ACTION in the PLACE .',
    'speech': '" i like this [COLOR] OBJECT , " SAID NAME .',
    'question': '" can we ACTION at the PLACE ? " SAID NAME .',
    'state': 'SUBJECT was very FEELING .',
    'weather': 'the day was WEATHER , so SUBJECT stayed in the PLACE .',
    'gift': 'SUBJECT gave the [SIZE] OBJECT to POSSESSIVE FAMILY .',
    'help': 'POSSESSIVE FAMILY helped NAME VERB the OBJECT .',
    'ending': 'from that day on , NAME was always FEELING .',
    'the_end': 'the end .',
}

_MIDDLE_PATTERNS = (
    'outing',
    'discovery',
    'want',
    'feeling',
    'play',
    'speech',
    'question',
    'state',
    'weather',
    'gift',
    'help',
)
_WORD_RE = re.compile(r'[a-z0-9]+|[^\sa-z0-9]')


def words(text: str) -> list[str]:
    """Lower-cases `text` and splits it into words and punctuation marks, ignoring spacing."""
    return _WORD_RE.findall(text.lower())


def _parse_pattern(pattern: str) -> tuple[tuple[str, bool], ...]:
    """Turns a pattern string into (item, optional) pairs."""
    items, optional = [], False
    for raw in pattern.split():
        item = raw
        if item.startswith('['):
            optional, item = True, item[1:]
        closes = item.endswith(']')
        items.append((item.rstrip(']'), optional))
        if closes:
            optional = False
    return tuple(items)


_PARSED = {name: _parse_pattern(p) for name, p in PATTERNS.items()}
_SLOT_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    cat: tuple(tuple(words(p)) for p in phrases) for cat, phrases in CATEGORIES.items()
}
_SLOT_PHRASES['SUBJECT'] = _SLOT_PHRASES['NAME'] + _SLOT_PHRASES['PRONOUN']


def vocabulary() -> set[str]:
    """Every word and mark the grammar can emit."""
    vocab = {w for phrases in _SLOT_PHRASES.values() for phrase in phrases for w in phrase}
    for items in _PARSED.values():
        vocab.update(item for item, _ in items if item not in _SLOT_PHRASES)
    return vocab


class StoryGrammar:
    """Samples stories; deterministic given `seed`.

    A story keeps one hero (name + pronoun) and a friend, so sentences refer to the same
    characters, but every sentence is drawn from `PATTERNS` and can be recognised alone.

    Args:
        seed: Seed of the private random generator.
        min_middle: Fewest middle sentences per story.
        max_middle: Most middle sentences per story.
    """

    def __init__(self, seed: int = 0, min_middle: int = 3, max_middle: int = 7) -> None:
        self._rng = random.Random(seed)
        self.min_middle = min_middle
        self.max_middle = max_middle

    def _fill(self, pattern: str, cast: dict[str, str]) -> str:
        rng = self._rng
        out = []
        for item, optional in _PARSED[pattern]:
            if optional and rng.random() < 0.5:
                continue
            if item == 'SUBJECT':
                out.append(cast['NAME'] if rng.random() < 0.5 else cast['PRONOUN'])
            elif item in ('NAME', 'PRONOUN', 'POSSESSIVE'):
                # The second NAME of a sentence is the friend.
                key = 'FRIEND' if item == 'NAME' and cast['NAME'] in out else item
                out.append(cast[key])
            elif item in CATEGORIES:
                out.append(rng.choice(CATEGORIES[item]))
            else:
                out.append(item)
        return ' '.join(out)

    def sentence(self, pattern: str) -> str:
        """One sentence of the named pattern with a fresh cast, as space-separated words."""
        return self._fill(pattern, self._cast())

    def _cast(self) -> dict[str, str]:
        rng = self._rng
        name, friend = rng.sample(CATEGORIES['NAME'], 2)
        gender = rng.randrange(3)
        return {
            'NAME': name,
            'FRIEND': friend,
            'PRONOUN': CATEGORIES['PRONOUN'][gender],
            'POSSESSIVE': CATEGORIES['POSSESSIVE'][gender],
        }

    def story(self) -> str:
        """One story: an opening, 3-7 middle sentences, a moral and often 'the end .'."""
        rng = self._rng
        cast = self._cast()
        names = ['opening', 'home'] if rng.random() < 0.5 else ['opening']
        names += rng.choices(_MIDDLE_PATTERNS, k=rng.randint(self.min_middle, self.max_middle))
        names += ['ending', 'the_end'] if rng.random() < 0.5 else ['ending']
        return _detokenize(' '.join(self._fill(n, cast) for n in names))

    def stories(self, n: int) -> Iterator[str]:
        """`n` stories in order."""
        for _ in range(n):
            yield self.story()


def _detokenize(text: str) -> str:
    """Readable text: capitalised sentences, no space before punctuation."""
    text = re.sub(r' ([.,?])', r'\1', text)
    text = re.sub(r'\b(i|' + '|'.join(CATEGORIES['NAME']) + r')\b', lambda m: m.group(1).capitalize(), text)
    return re.sub(r'(^|[.?] )([a-z])', lambda m: m.group(1) + m.group(2).upper(), text)


@functools.lru_cache(maxsize=65536)
def _matches(pattern: str, tokens: tuple[str, ...]) -> bool:
    items = _PARSED[pattern]

    @functools.cache
    def match(i: int, j: int) -> bool:
        # Can items[i:] derive tokens[j:]?
        if i == len(items):
            return j == len(tokens)
        item, optional = items[i]
        if optional and match(i + 1, j):
            return True
        if item not in _SLOT_PHRASES:
            return j < len(tokens) and tokens[j] == item and match(i + 1, j + 1)
        return any(
            tuple(tokens[j : j + len(p)]) == p and match(i + 1, j + len(p)) for p in _SLOT_PHRASES[item]
        )

    return match(0, 0)


def recognise(sentence: str | Sequence[str]) -> bool:
    """Whether one sentence is derivable from the grammar (case and spacing are ignored)."""
    tokens = tuple(words(sentence) if isinstance(sentence, str) else sentence)
    return any(_matches(name, tokens) for name in PATTERNS)


def split_sentences(text: str) -> list[list[str]]:
    """Splits text into sentences of words; a sentence ends at '.' or '?' outside quotes.

    A trailing fragment without an end mark is returned as a sentence too (it will not be
    recognised), so truncated samples are not scored as clean.
    """
    sentences, current, in_quote = [], [], False
    for w in words(text):
        current.append(w)
        if w == '"':
            in_quote = not in_quote
        elif w in '.?' and not in_quote:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def recognised_fraction(texts: Sequence[str]) -> float:
    """Fraction of all sentences in `texts` the grammar derives (0.0 when there are none)."""
    sentences = [s for text in texts for s in split_sentences(text)]
    if not sentences:
        return 0.0
    return sum(recognise(s) for s in sentences) / len(sentences)


# -- exact probabilities --------------------------------------------------------------------------
# The generator's draws, as `StoryGrammar` makes them: the cast (hero, a different friend,
# one of three genders), 'home' and 'the_end' each with probability 1/2, the number of middle
# sentences uniform in [min_middle, max_middle], each middle pattern uniform, each optional item
# kept with probability 1/2, a SUBJECT the hero's name or pronoun with probability 1/2 each, the
# second NAME of a sentence the friend, and every other slot uniform over its category.


def _slot_choices(
    item: str, cast: tuple[str, str, int], named: bool
) -> list[tuple[tuple[str, ...], float, bool]]:
    """(words, probability, names the hero) for each way `item` can be filled."""
    hero, friend, gender = cast
    if item == 'SUBJECT':
        return [((hero,), 0.5, True), ((CATEGORIES['PRONOUN'][gender],), 0.5, False)]
    if item == 'NAME':
        return [((friend,), 1.0, False)] if named else [((hero,), 1.0, True)]
    if item in ('PRONOUN', 'POSSESSIVE'):
        return [((CATEGORIES[item][gender],), 1.0, False)]
    if item in CATEGORIES:
        phrases = _SLOT_PHRASES[item]
        return [(phrase, 1.0 / len(phrases), False) for phrase in phrases]
    return [((item,), 1.0, False)]


@functools.lru_cache(maxsize=1 << 18)
def sentence_probability(pattern: str, tokens: tuple[str, ...], cast: tuple[str, str, int]) -> float:
    """P(the words `tokens` | pattern, cast): the sum over every fill of the pattern that yields them.

    Args:
        pattern: A name of `PATTERNS`.
        tokens: The sentence's words (`words`), its end mark included.
        cast: (hero's name, friend's name, gender index into PRONOUN/POSSESSIVE).
    """
    items = _PARSED[pattern]

    @functools.cache
    def rest(i: int, j: int, named: bool) -> float:  # P(items[i:] yield tokens[j:])
        if i == len(items):
            return 1.0 if j == len(tokens) else 0.0
        item, optional = items[i]
        total = 0.5 * rest(i + 1, j, named) if optional else 0.0
        keep = 0.5 if optional else 1.0
        for phrase, p, names_hero in _slot_choices(item, cast, named):
            if tokens[j : j + len(phrase)] == phrase:
                total += keep * p * rest(i + 1, j + len(phrase), named or names_hero)
        return total

    return rest(0, 0, False)


def _middles_probability(sentences: list[tuple[str, ...]], cast: tuple[str, str, int]) -> float:
    """P(these middle sentences | their number): each a uniform choice of middle pattern, then filled."""
    p = 1.0
    for sentence in sentences:
        p *= sum(sentence_probability(name, sentence, cast) for name in _MIDDLE_PATTERNS) / len(
            _MIDDLE_PATTERNS
        )
        if p == 0.0:
            break
    return p


def _story_probability(
    sentences: list[tuple[str, ...]], cast: tuple[str, str, int], min_middle: int, max_middle: int
) -> float:
    """P(the story's sentences | cast): opening, optional home, the middles, ending, optional 'the end'."""
    n = len(sentences)
    if n < 2 or not (p_open := sentence_probability('opening', sentences[0], cast)):
        return 0.0
    total = 0.0
    for home in (0, 1):
        p_home = 0.5 * (sentence_probability('home', sentences[1], cast) if home else 1.0)
        for the_end in (0, 1):
            p_end = 0.5 * (sentence_probability('the_end', sentences[-1], cast) if the_end else 1.0)
            ending = n - 1 - the_end
            k = ending - 1 - home
            if not p_home or not p_end or not min_middle <= k <= max_middle:
                continue
            p_ending = sentence_probability('ending', sentences[ending], cast)
            if p_ending:
                count = 1.0 / (max_middle - min_middle + 1)
                total += (
                    p_home
                    * p_end
                    * p_ending
                    * count
                    * _middles_probability(sentences[1 + home : ending], cast)
                )
    return p_open * total


def story_log_probability(text: str, min_middle: int = 3, max_middle: int = 7) -> float:
    """Ln P(text) under `StoryGrammar(min_middle=..., max_middle=...)`, exactly; -inf if it cannot be drawn.

    Case and spacing are ignored (`words`), as the detokeniser fixes them. The draws the text
    does not reveal are summed over: a friend who never appears, the gender of a story without
    pronouns, and fills that yield the same words.
    """
    sentences = [tuple(s) for s in split_sentences(text)]
    names = CATEGORIES['NAME']
    present = sorted({w for s in sentences for w in s if w in names})
    absent = [name for name in names if name not in present]
    total = 0.0
    for hero in present:
        friends = [(f, 1) for f in present if f != hero]
        if absent:  # every friend the text never names gives the same probability
            friends.append((absent[0], len(absent)))
        for friend, multiplicity in friends:
            for gender in range(len(CATEGORIES['PRONOUN'])):
                p_cast = multiplicity / (len(names) * (len(names) - 1) * len(CATEGORIES['PRONOUN']))
                total += p_cast * _story_probability(
                    sentences, (hero, friend, gender), min_middle, max_middle
                )
    return math.log(total) if total > 0 else -math.inf
