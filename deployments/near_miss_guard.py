"""The check a semantic hit must pass beyond the cosine threshold.

Bi-encoders score "same question reworded" and "same template, one slot
changed" alike ("convert 100 F to C" vs "100 C to F" is 0.99), so a hit is
verified lexically: two prompts whose content words differ by a number, a
negation, an opposite, a reordering, or a one/two-word slot are different
questions however close their vectors are; so are two that ask for different
kinds of answer (who vs where) or for one side of a two-sided question
("advantages" vs "advantages and disadvantages"). Each rule rejects; passing all
of them accepts. The rules were chosen by measuring, on labelled question pairs,
how many wrong hits each removes against how many right ones it costs
(see bench/cache_eval.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

from pydantic import BaseModel

_CONTRACTIONS = (
    (re.compile(r"\bcan'?t\b"), "can not"),
    (re.compile(r"\bwon'?t\b"), "will not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'(s|re|ve|ll|d|m)\b"), ""),
)
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")
_NEGATIONS = frozenset(
    "not no never without cannot nor none nobody nothing neither nowhere".split()
)
_WH = frozenset("what who whom whose where when why how which".split())
# Spelled-out numbers count as numbers ("two ways" vs "three ways", "2" vs "two"), except
# a count only one prompt spells out ("the five best films" vs "the best films"): that is
# incidental far more often than a digit. "one" is left out: as often a pronoun.
_NUMBER_WORDS = {
    w: str(v)
    for v, w in enumerate(
        "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen"
        " fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
    if w != "_"
} | {
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
    "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
    "million": "1000000", "billion": "1000000000", "dozen": "12",
}  # fmt: skip
_ANSWER_TYPES = frozenset("who whom whose where when why".split())
_POLE_JOINERS = frozenset("and or vs versus".split())
# Function words carry the grammar, not the question; rewording changes them freely.
_STOPWORDS = (
    frozenset(
        """a an the is are was were be been being am do does did doing done have has had having
    i me my mine we us our you your yours he him his she her it its they them their this that
    these those there here of in on at by for with about as into onto from up out over under
    again then once so than too very just also only own same such some any all each every both
    few more most other can could will would shall should may might must to and or but if
    while because until whether what who whom whose where when why how which way ways get
    one someone something anyone anything thing things really actually possible please
    good best better""".split()
    )
    - _NEGATIONS
)
# Generic opposites ("antonym-ish" slots); prefix opposites (un-, dis-, ...) are derived.
_OPPOSITES = (
    ("more", "less"),
    ("increase", "decrease"),
    ("before", "after"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("hot", "cold"),
    ("soft", "hard"),
    ("up", "down"),
    ("buy", "sell"),
    ("best", "worst"),
    ("good", "bad"),
    ("better", "worse"),
    ("pros", "cons"),
    ("start", "stop"),
    ("open", "close"),
    ("add", "remove"),
    ("win", "lose"),
    ("male", "female"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("husband", "wife"),
    ("father", "mother"),
    ("son", "daughter"),
    ("brother", "sister"),
    ("old", "new"),
    ("high", "low"),
    ("ascending", "descending"),
    ("import", "export"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("upload", "download"),
    ("first", "last"),
    ("on", "off"),
    ("true", "false"),
    ("positive", "negative"),
    ("rich", "poor"),
    ("fast", "slow"),
    ("big", "small"),
    ("long", "short"),
    ("love", "hate"),
    ("always", "never"),
    ("accept", "reject"),
    ("allow", "deny"),
    ("include", "exclude"),
    ("inside", "outside"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("summer", "winter"),
    ("day", "night"),
)
_OPPOSITE_OF = {a: b for a, b in _OPPOSITES} | {b: a for a, b in _OPPOSITES}
_NEG_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "de", "anti", "mis", "en")


class GuardSettings(BaseModel):
    """``args.semantic_cache.guard``: each rule can be switched off."""

    enabled: bool = True
    numbers: bool = True
    negation: bool = True
    opposites: bool = True
    swapped_span: bool = True
    substitution: bool = True
    max_substitution_words: int = 2
    question_word: bool = False  # measured: costs three right hits per wrong one removed
    # A name or symbol asked about in one prompt and absent from the other ("English
    # honours from DU" vs "English honours"). Measured: +0.001 precision at recall 0.30,
    # -0.005 at 0.50 (three right hits lost per wrong one), so strict deployments only.
    entity: bool = False
    # One prompt asks about both poles ("advantages and disadvantages"), the other one.
    one_sided: bool = True
    # Who/where/when/why ask for a person, place, time, reason: two disjoint sets of them
    # are two questions. What/which/how are left out: rewordings trade them freely.
    answer_type: bool = True


@dataclass(frozen=True, slots=True)
class GuardVerdict:
    ok: bool
    reason: str | None = None  # the rule that rejected


@dataclass(frozen=True, slots=True)
class _Parsed:
    words: tuple[str, ...]  # every word, lower-cased
    names: frozenset[str]  # stems of words written as names (capitalised mid-sentence) or symbols
    content: tuple[str, ...]  # stems of content words, in order
    numbers: tuple[str, ...]  # digits and spelled-out numbers, as digits
    spelled: frozenset[str]  # numbers written as words ("five" -> "5")
    negations: int
    wh: frozenset[str]


def _stem(word: str) -> str:
    """A crude stemmer: enough to see "learn"/"learning" and "city"/"cities" as one."""
    for suffix, repl, min_len in (
        ("ies", "y", 5),
        ("ing", "", 6),
        ("ed", "", 5),
        ("es", "", 5),
        ("s", "", 4),
    ):
        if len(word) >= min_len and word.endswith(suffix) and not word.endswith("ss"):
            return word[: -len(suffix)] + repl
    return word


def _is_number(word: str) -> bool:
    return word[0].isdigit() or word in _NUMBER_WORDS


@lru_cache(maxsize=8192)
def _parse(text: str) -> _Parsed:
    low = text.lower().replace("\u2019", "'")
    for pattern, repl in _CONTRACTIONS:
        low = pattern.sub(repl, low)
    words = tuple(_TOKEN.findall(low))
    raw = _TOKEN.findall(text)
    names = frozenset(
        _stem(w.lower()) for k, w in enumerate(raw) if (k > 0 and w[0].isupper()) or len(w) == 1
    )
    numbers = tuple(
        sorted(_NUMBER_WORDS.get(w) or w.replace(",", "") for w in words if _is_number(w))
    )
    content = tuple(
        _stem(w) for w in words if w not in _STOPWORDS and w not in _NEGATIONS and not _is_number(w)
    )
    negations = sum(1 for w in words if w in _NEGATIONS)
    return _Parsed(
        words,
        names,
        content,
        numbers,
        frozenset(_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS),
        negations,
        frozenset(w for w in words if w in _WH),
    )


def _numbers_differ(qa: _Parsed, qb: _Parsed) -> bool:
    """Different numbers, unless the only difference is a count one side spells out."""
    ca, cb = Counter(qa.numbers), Counter(qb.numbers)
    extra_a, extra_b = ca - cb, cb - ca
    if not extra_a and not extra_b:
        return False
    if extra_a and extra_b:
        return True
    extra, side = (extra_a, qa) if extra_a else (extra_b, qb)
    return not set(extra) <= side.spelled


def _roots(word: str) -> set[tuple[str, str]]:
    """(prefix, root) readings of a word, "" for no prefix: "disable" -> ("dis", "able")."""
    found = {("", word)}
    for p in _NEG_PREFIXES:
        if word.startswith(p) and len(word) - len(p) >= 3:
            found.add((p, word[len(p) :]))
    return found


def _is_opposite(a: str, b: str) -> bool:
    """Listed opposites, or one root under two different prefixes (able/unable, enable/disable)."""
    if _OPPOSITE_OF.get(a) == b:
        return True
    roots_b = _roots(b)
    return any(root == rb and pa != pb for pa, root in _roots(a) for pb, rb in roots_b)


def _opposite_words(qa: _Parsed, qb: _Parsed) -> bool:
    only_a = set(qa.words) - set(qb.words)
    only_b = set(qb.words) - set(qa.words)
    return any(
        _is_opposite(w, v) or _is_opposite(_stem(w), _stem(v)) for w in only_a for v in only_b
    )


def _slot_changed(qa: _Parsed, qb: _Parsed, max_words: int) -> bool:
    """Same template with a name or symbol slot swapped ("in Ohio" -> "in Texas", "F" -> "C").

    Only names count: swapping an ordinary word is as often a rewording ("really" for
    "actually") as a new question, and measured so on labelled pairs.
    """
    a, b = qa.content, qb.content
    ops = [op for op in SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1 or ops[0][0] != "replace":
        return False
    _, i1, i2, j1, j2 = ops[0]
    if len(a) - (i2 - i1) < 1 or (i2 - i1) > max_words or (j2 - j1) > max_words:
        return False
    swapped = set(a[i1:i2]) | set(b[j1:j2])
    return bool(swapped & (qa.names | qb.names))


def _entity_added(qa: _Parsed, qb: _Parsed) -> bool:
    """A name or symbol among one prompt's content words that the other never mentions."""
    return bool((set(qa.content) ^ set(qb.content)) & (qa.names | qb.names))


def _coordinated_poles(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Opposites joined by a conjunction: "advantages and disadvantages", "buy or sell"."""
    found = []
    for k, word in enumerate(words[1:-1], start=1):
        if word in _POLE_JOINERS:
            left, right = words[k - 1], words[k + 1]
            if _is_opposite(left, right) or _is_opposite(_stem(left), _stem(right)):
                found.append((left, right))
    return found


def _one_sided(qa: _Parsed, qb: _Parsed) -> bool:
    """One prompt asks about a word and its opposite, the other about only one of them."""
    for x, y in ((qa, qb), (qb, qa)):
        have = set(y.words)
        if any((a in have) != (b in have) for a, b in _coordinated_poles(x.words)):
            return True
    return False


def _answer_type_differs(qa: _Parsed, qb: _Parsed) -> bool:
    ta, tb = qa.wh & _ANSWER_TYPES, qb.wh & _ANSWER_TYPES
    return bool(ta) and bool(tb) and not (ta & tb)


class NearMissGuard:
    """``verify(query, cached)`` accepts a candidate hit or names the rule that rejects it."""

    def __init__(self, settings: GuardSettings | None = None) -> None:
        self._cfg = settings or GuardSettings()

    def verify(self, query: str, cached: str) -> GuardVerdict:
        cfg = self._cfg
        if not cfg.enabled or query == cached:
            return GuardVerdict(True)
        qa, qb = _parse(query), _parse(cached)
        if cfg.numbers and _numbers_differ(qa, qb):
            return GuardVerdict(False, "numbers")
        if cfg.negation and (qa.negations % 2) != (qb.negations % 2):
            return GuardVerdict(False, "negation")
        if cfg.opposites and _opposite_words(qa, qb):
            return GuardVerdict(False, "opposites")
        if cfg.swapped_span and qa.content != qb.content:
            if Counter(qa.content) == Counter(qb.content):
                return GuardVerdict(False, "swapped_span")
        if cfg.substitution and _slot_changed(qa, qb, cfg.max_substitution_words):
            return GuardVerdict(False, "substitution")
        return self._scope(qa, qb)

    def _scope(self, qa: _Parsed, qb: _Parsed) -> GuardVerdict:
        """Rules for two prompts about the same thing that differ in what they ask of it."""
        cfg = self._cfg
        if cfg.entity and _entity_added(qa, qb):
            return GuardVerdict(False, "entity")
        if cfg.one_sided and _one_sided(qa, qb):
            return GuardVerdict(False, "one_sided")
        if cfg.question_word and qa.wh and qb.wh and not (qa.wh & qb.wh):
            return GuardVerdict(False, "question_word")
        if cfg.answer_type and _answer_type_differs(qa, qb):
            return GuardVerdict(False, "answer_type")
        return GuardVerdict(True)
