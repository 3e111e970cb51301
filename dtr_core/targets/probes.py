"""Synthetic in-context recall probes: pass-key retrieval, multi-key needle and key–value lookup.

Why: a linear-attention layer keeps a fixed-size state, so what a hybrid loses first is exact recall
of an arbitrary token seen far back in the context (Zoology, Arora et al. 2023, traces the gap
between attention and its sub-quadratic replacements to such associative recall); perplexity and
short classification tasks barely see it. These probes ask for exactly that. Each example is a
prompt of about ``context_tokens`` tokens that hides one or more facts and ends by asking for one of
them; the model continues the prompt greedily and an example counts as right when the generated
text contains the answer (the ``contains`` scorer). ``probe_max_new_tokens`` gives the tokens to
generate (the answer's + 4).

The three kinds follow the standard synthetic long-context tests (formats written from their
published descriptions, no code taken):

- ``passkey``: pass-key retrieval, introduced by Mohtashami & Jaggi (2023, Landmark Attention) and
  used by long-context suites since (InfiniteBench's Retrieve.PassKey, RULER's needle tests): one
  5-digit pass key hidden in filler text::

      There is a pass key hidden in the following text. Remember it.

      <filler> The pass key is 48213. Remember it. <filler>

      What is the pass key? Give the number.
      The pass key is                      <- answer lead-in; the model writes " 48213"

  ("Give the number." matters for small models: without it SmolLM2-135M often explains what a
  pass key is, 0.75–0.80 at 256 tokens instead of 1.00.)
- ``multi_key_needle``: RULER's multi-key needle in a haystack (Hsieh et al., 2024): ``num_needles``
  (default 4) needles ``The special magic number for <word> is <number>.`` at different depths;
  the question ``What is the special magic number for <word>?`` asks for one, the others are
  distractors; lead-in ``The special magic number for <word> is``. Keys are distinct real words of
  the haystack (lower-case, 5–12 letters), numbers distinct 5-digit numbers.
- ``kv_lookup``: key–value retrieval as in Lost in the Middle's (Liu et al., 2023) JSON key–value
  task and InfiniteBench's Retrieve.KV: the whole context is a list of lines ``"<word>": <number>,``
  (distinct real words of the haystack, distinct 5-digit numbers), no filler: the distractors are
  the other pairs. Question ``What is the number for "<word>"?``, lead-in ``"<word>":``. The lead-in
  repeats what precedes the value in the list: with ``The number for <word> is`` SmolLM2-135M
  scored 0.40 at 256 tokens, with this one 0.90–1.00. A list grows one pair (about 10 tokens) at a
  time, so contexts under about 100 tokens may not land within 10% (a ``ValueError`` says so).

Construction:

- The filler is real text (the built-in BBC News corpus or the task's own texts), whitespace
  collapsed; a line break ends a sentence. Documents are taken in a seeded order and tokenised once
  with the teacher's tokenizer (offsets kept); each example's filler starts at a seeded sentence
  start and is cut at a token offset that ends a word, so its length is measured in the teacher's
  tokens, not guessed from characters. It may run from one document into the next.
- Needles go between sentences (a needle never splits a filler sentence; a filler cut short of its
  sentence's end ends mid-sentence). The asked needle's depth (the fraction of the filler before
  it; for ``kv_lookup`` the asked pair's position in the list) runs evenly from 0 to 1 over the
  ``count`` examples in a seeded order, so a score averages over depths. Distractor needles go to
  random depths.
- Length: each example's ``input_ids`` (the whole prompt as the model sees it) has between
  ``0.9 * context_tokens`` and ``context_tokens`` tokens: the filler (or the number of pairs) is
  fitted by re-tokenising the assembled prompt.
- Chat template: a tokenizer with one gets the prompt as a user message, the template's generation
  prompt, then the answer lead-in, tokenised without adding special tokens again (the template text
  already holds whatever BOS the model expects, as ``apply_chat_template(tokenize=True)`` does), so
  there is never a double BOS. Without one the plain text ends in the question, a new line and the
  lead-in, tokenised with the tokenizer's own special tokens.
- The answer occurs exactly once in the prompt: numbers that occur in the filler are never drawn.
- Everything is drawn from ``random.Random`` seeded with (kind, seed): the same arguments give the
  same examples on every machine.

Where the teachers' scores fall. SmolLM2-135M-Instruct (the built-in decoder; MiniLM is an encoder
and cannot be asked), the full model in float32 on CPU, greedy, ``max_new_tokens`` from
``probe_max_new_tokens``, BBC News train texts, 20 examples per cell, seeds 0 / 1::

    kind               256 tokens    512 tokens    1024 tokens
    passkey            1.00 / 1.00   0.95 / 1.00   0.90 / 1.00
    multi_key_needle   0.95 / 1.00   0.75 / 0.95   0.95 / 0.85
    kv_lookup          0.90 / 1.00   0.90 / 0.95   0.75 / 0.85

so every probe is answerable by the full teacher at short lengths: what a hybrid loses there is its
own. The 20-example cells move by ±0.1 between seeds; use 40 or more examples for a guard.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from ..specs import PROBE_KINDS

__all__ = ["PROBE_KINDS", "ProbeExample", "probe_examples", "probe_max_new_tokens"]

# The prompt may fall short of ``context_tokens`` by at most this fraction.
LENGTH_SLACK = 0.1
NUMBER_DIGITS = 5
DEFAULT_NUM_NEEDLES = 4
_MAX_FIT_STEPS = 40
# Documents tokenised per tokenizer call while the filler stream grows.
_DOCUMENT_BATCH = 32

_PASSKEY_INTRO = "There is a pass key hidden in the following text. Remember it."
_PASSKEY_NEEDLE = "The pass key is {value}. Remember it."
_PASSKEY_QUESTION = "What is the pass key? Give the number."
_PASSKEY_LEAD = "The pass key is"

_MULTI_INTRO = "Some special magic numbers are hidden in the following text. Remember them."
_MULTI_NEEDLE = "The special magic number for {key} is {value}."
_MULTI_QUESTION = "What is the special magic number for {key}?"
_MULTI_LEAD = "The special magic number for {key} is"

_KV_INTRO = "Here is a list of words, each with its number. Remember them."
_KV_PAIR = '"{key}": {value},'
_KV_QUESTION = 'What is the number for "{key}"?'
_KV_LEAD = '"{key}":'

# A sentence ends at . ! or ? (closing quotes/brackets included) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
# Candidate keys: lower-case words of 5–12 letters as they occur in the text (no names, no numbers).
_KEY_WORD = re.compile(r"(?<![\w'-])[a-z]{5,12}(?![\w'-])")
_DIGIT_RUN = re.compile(r"\d+")
# Words too empty to serve as keys.
_STOP_WORDS = frozenset("""
    about above after again against along already also although always among another around
    because become been before being below between both cannot could during each either enough
    every first following from further given having however included including itself later least
    might more most much must never often other others ought over perhaps quite rather really said
    same several shall should since some still such than that their them themselves then there
    these they thing things this those though three through thus together under until upon very
    were what when where whether which while whole whose will with within without would years
    yesterday
""".split())


@dataclass(frozen=True)
class ProbeExample:
    """One probe prompt: ``input_ids`` is the whole prompt as the model sees it (chat template and
    answer lead-in included); the model's continuation is right when it contains one of ``answers``."""

    input_ids: tuple[int, ...]
    answers: tuple[str, ...]


def probe_examples(kind: str, tokenizer, haystack: Sequence[str], *, context_tokens: int, count: int,
                   seed: int, num_needles: int = DEFAULT_NUM_NEEDLES) -> list[ProbeExample]:
    """``count`` examples of probe ``kind`` of about ``context_tokens`` tokens each (within
    [0.9 * context_tokens, context_tokens]), built with ``tokenizer`` from the real texts ``haystack``.

    ``num_needles`` (``multi_key_needle`` only): needles per example, the asked one included.
    Raises ``ValueError`` for an unknown kind, a context too short to hold the instructions, needles
    and question, or a haystack with too little text (or too few distinct words for the keys).
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; use one of {list(PROBE_KINDS)}")
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context_tokens={context_tokens!r}: must be a positive number of tokens")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r}: must be a positive number of examples")
    if kind == "multi_key_needle" and (isinstance(num_needles, bool) or not isinstance(num_needles, int)
                                       or num_needles < 2):
        raise ValueError(f"num_needles={num_needles!r}: a multi-key needle needs at least 2 needles "
                         "(the asked one and a distractor)")
    if isinstance(haystack, str):
        raise ValueError("haystack must be a sequence of documents (texts), not one string")
    documents = [_collapse_lines(text) for text in haystack if isinstance(text, str)]
    documents = [lines for lines in documents if lines]
    if not documents:
        raise ValueError("the haystack holds no text: give real documents (e.g. the task's texts)")

    rng = random.Random(f"dtr-probe:{kind}:{seed}")
    depths = [0.5] if count == 1 else [i / (count - 1) for i in range(count)]
    rng.shuffle(depths)
    encode = _encoder(tokenizer)
    if kind == "kv_lookup":
        words = _key_words(documents, rng)
        return [_kv_example(encode, words, depth, context_tokens, rng) for depth in depths]
    stream = _FillerStream(tokenizer, documents, rng, context_tokens, context_tokens * (min(count, 8) + 1))
    keys = _key_words(documents, rng) if kind == "multi_key_needle" else []
    return [_needle_example(kind, encode, stream, keys, num_needles, depth, context_tokens, rng)
            for depth in depths]


def probe_max_new_tokens(tokenizer, examples: Sequence[ProbeExample], extra: int = 4) -> int:
    """Tokens to generate for ``examples``: the longest answer's tokens (with its leading space) + ``extra``."""
    return max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"])
               for example in examples for a in example.answers) + extra


# ---------------------------------------------------------------- prompt assembly


def _encoder(tokenizer) -> Callable[[str, str], list[int]]:
    """(user text, answer lead-in) → the prompt's token ids, through the chat template if there is one."""
    if getattr(tokenizer, "chat_template", None):
        def encode(text: str, lead: str) -> list[int]:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   add_generation_prompt=True, tokenize=False)
            # The template already wrote the special tokens it wants (BOS included).
            return list(tokenizer(prompt + lead, add_special_tokens=False)["input_ids"])
    else:
        def encode(text: str, lead: str) -> list[int]:
            return list(tokenizer(text + "\n" + lead)["input_ids"])
    return encode


def _fit(build: Callable[[int], list[int]], context_tokens: int, start: int, per_unit: float,
         what: str) -> tuple[int, list[int]]:
    """``(n, build(n))`` for an ``n`` whose prompt length lies in [(1 - LENGTH_SLACK) * context_tokens,
    context_tokens]. Steps ``n`` by the miss in tokens over the tokens one unit of ``n`` adds
    (``per_unit`` at first, then measured from the last two builds). The caller has checked that the
    smallest ``n`` fits."""
    lowest = math.ceil((1 - LENGTH_SLACK) * context_tokens)
    n, tried, previous = max(start, 0), {}, None
    for _ in range(_MAX_FIT_STEPS):
        ids = tried[n] = build(n)
        if lowest <= len(ids) <= context_tokens:
            return n, ids
        if previous is not None and previous[0] != n:
            per_unit = max((len(ids) - previous[1]) / (n - previous[0]), 0.5)
        previous = (n, len(ids))
        miss = context_tokens - len(ids)  # aim at the top of the range
        step = int(miss / per_unit) or (1 if miss > 0 else -1)
        following = max(n + step, 0)
        if following in tried:  # oscillating: move by one unit instead
            following = max(n + (1 if step > 0 else -1), 0)
            if following in tried:
                break
        n = following
    below = max((len(ids) for ids in tried.values() if len(ids) <= context_tokens), default=None)
    raise ValueError(f"could not fit the {what} into [{lowest}, {context_tokens}] tokens (nearest below: "
                     f"{below} tokens): one step adds about {per_unit:.0f} tokens, too coarse for this "
                     f"context; raise context_tokens")


def _too_short(kind: str, context_tokens: int, fixed: int) -> ValueError:
    return ValueError(f"context_tokens={context_tokens} is too short for a {kind} probe with this tokenizer: "
                      f"the template, instructions, needle(s) and question alone take {fixed} tokens; "
                      f"give at least {math.ceil(fixed * 1.25)}")


def _needle_example(kind: str, encode, stream: _FillerStream, keys: list[str], num_needles: int,
                    depth: float, context_tokens: int, rng: random.Random) -> ProbeExample:
    if kind == "passkey":
        value = stream.fresh_number(rng, set())
        needles = [(depth, _PASSKEY_NEEDLE.format(value=value))]
        intro, question, lead = _PASSKEY_INTRO, _PASSKEY_QUESTION, _PASSKEY_LEAD
    else:
        chosen = rng.sample(keys, num_needles)
        values: list[str] = []
        for _ in chosen:
            values.append(stream.fresh_number(rng, set(values)))
        # The asked needle (first) at the example's depth; the distractors anywhere.
        spots = [depth] + [rng.random() for _ in chosen[1:]]
        needles = [(spot, _MULTI_NEEDLE.format(key=key, value=v)) for spot, key, v in zip(spots, chosen, values)]
        value, key = values[0], chosen[0]
        intro, question, lead = _MULTI_INTRO, _MULTI_QUESTION.format(key=key), _MULTI_LEAD.format(key=key)
    start = stream.random_start(rng)

    def build(filler_tokens: int) -> list[int]:
        body = stream.filler_with_needles(start, filler_tokens, needles)
        return encode(f"{intro}\n\n{body}\n\n{question}", lead)

    fixed = len(build(0))
    if fixed > context_tokens:
        raise _too_short(kind, context_tokens, fixed)
    _, ids = _fit(build, context_tokens, context_tokens - fixed, 1.0, f"{kind} prompt")
    return ProbeExample(tuple(ids), (value,))


def _kv_example(encode, words: list[str], depth: float, context_tokens: int,
                rng: random.Random) -> ProbeExample:
    # The pairs' order is drawn once; a list of n pairs is its first n, so n only sets the length.
    order = rng.sample(words, len(words))
    numbers = _LazyNumbers(random.Random(rng.random()))

    def asked(n: int) -> int:
        return round(depth * (n - 1))  # the asked pair sits at ``depth`` of the list

    def build(n: int) -> list[int]:
        if n > len(order):
            raise ValueError(f"the haystack has only {len(order)} distinct key words; a kv_lookup context of "
                             f"{context_tokens} tokens needs more: give more text or lower context_tokens")
        n = max(n, 1)
        key = order[asked(n)]
        lines = "\n".join(_KV_PAIR.format(key=k, value=numbers[i]) for i, k in enumerate(order[:n]))
        return encode(f"{_KV_INTRO}\n\n{lines}\n\n{_KV_QUESTION.format(key=key)}", _KV_LEAD.format(key=key))

    if len(order) < 2:
        raise ValueError(f"the haystack has {len(order)} distinct key words; kv_lookup needs many (lower-case "
                         "words of 5-12 letters): give more text")
    fixed = len(build(1))
    if fixed > context_tokens:
        raise _too_short("kv_lookup", context_tokens, fixed)
    per_pair = max(len(build(2)) - fixed, 1)
    start = min(1 + (context_tokens - fixed) // per_pair, len(order))
    n, ids = _fit(build, context_tokens, start, per_pair, "kv_lookup list")
    return ProbeExample(tuple(ids), (numbers[asked(max(n, 1))],))


# ---------------------------------------------------------------- haystack


def _collapse_lines(text: str) -> list[str]:
    """The text's non-empty lines, whitespace collapsed (a line break ends a sentence)."""
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _key_words(documents: list[list[str]], rng: random.Random) -> list[str]:
    """Distinct lower-case content words of the haystack, in a seeded order."""
    words = {w for lines in documents for line in lines for w in _KEY_WORD.findall(line)} - _STOP_WORDS
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered


def _draw_number(rng: random.Random, *avoid: Container[str]) -> str:
    """A random 5-digit number in none of ``avoid``."""
    for _ in range(100_000):
        value = str(rng.randint(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS - 1))
        if not any(value in taken for taken in avoid):
            return value
    raise ValueError(f"no {NUMBER_DIGITS}-digit number is left to draw: the haystack and the list use them all")


class _LazyNumbers:
    """Distinct 5-digit numbers drawn in order as they are asked for: ``numbers[i]`` is the same
    whatever is asked first, and only as many are drawn as a list uses."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.drawn, self.taken = rng, [], set()

    def __getitem__(self, index: int) -> str:
        while len(self.drawn) <= index:
            value = _draw_number(self.rng, self.taken)
            self.taken.add(value)
            self.drawn.append(value)
        return self.drawn[index]


class _FillerStream:
    """Haystack documents in a seeded order, joined by spaces into one stream and tokenised once.

    Keeps where every token ends, where sentences start, and which numbers occur (never drawn as
    answers). Documents are tokenised in batches until the stream holds ``wanted_tokens`` or the
    haystack runs out; a filler (at most ``context_tokens``) starts at a sentence that many tokens
    before the stream's end or earlier.
    """

    def __init__(self, tokenizer, documents: list[list[str]], rng: random.Random, context_tokens: int,
                 wanted_tokens: int) -> None:
        self.context_tokens = context_tokens
        order = list(range(len(documents)))
        rng.shuffle(order)
        parts: list[str] = []
        length = 0  # of " ".join(parts)
        self.token_ends: list[int] = []
        self.sentence_starts: list[int] = []
        self.numbers: set[str] = set()
        for first in range(0, len(order), _DOCUMENT_BATCH):
            texts, starts = [], []
            for index in order[first:first + _DOCUMENT_BATCH]:
                text, sentence_starts = _join_sentences(documents[index])
                texts.append(text)
                starts.append(sentence_starts)
            encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            for text, sentence_starts, offsets in zip(texts, starts, encoded["offset_mapping"]):
                base = length + (1 if parts else 0)
                parts.append(text)
                length = base + len(text)
                self.token_ends.extend(base + end for _, end in offsets if end > 0)
                self.sentence_starts.extend(base + s for s in sentence_starts)
                for run in _DIGIT_RUN.findall(text):
                    self.numbers.update(run[i:i + NUMBER_DIGITS] for i in range(len(run) - NUMBER_DIGITS + 1))
            if len(self.token_ends) >= wanted_tokens:
                break
        self.text = " ".join(parts)

    def random_start(self, rng: random.Random) -> int:
        """A seeded sentence start with enough tokens after it for any filler of the context."""
        need = self.context_tokens
        usable = [s for s in self.sentence_starts if len(self.token_ends) - self._token_at(s) >= need]
        if not usable:
            raise ValueError(f"the haystack has too little text: {len(self.token_ends)} tokens in all, a context of "
                             f"{need} tokens needs a stretch of at least {need} tokens; give more or longer texts")
        return rng.choice(usable)

    def _token_at(self, char: int) -> int:
        """Index of the token covering character ``char`` (the first token ending after it)."""
        return bisect.bisect_right(self.token_ends, char)

    def fresh_number(self, rng: random.Random, taken: Container[str]) -> str:
        """A 5-digit number absent from the stream and from ``taken``."""
        return _draw_number(rng, self.numbers, taken)

    def filler_with_needles(self, start: int, filler_tokens: int, needles: list[tuple[float, str]]) -> str:
        """About ``filler_tokens`` tokens of the stream from character ``start`` (cut where a word ends),
        each needle put at the sentence boundary nearest its depth."""
        first = self._token_at(start)
        last = min(first + filler_tokens, len(self.token_ends))  # exclusive
        end = start
        while last > first:
            end = self.token_ends[last - 1]
            if end >= len(self.text) or self.text[end].isspace():
                break
            last -= 1
        if last <= first:
            end = start
        filler = self.text[start:end]
        # Sentence boundaries inside the filler (relative characters), its start and end included.
        lo = bisect.bisect_right(self.sentence_starts, start)
        hi = bisect.bisect_left(self.sentence_starts, end)
        boundaries = [0, *(s - start for s in self.sentence_starts[lo:hi]), len(filler)]
        token_positions = [self._token_at(start + b) - first for b in boundaries]
        span = max(last - first, 0)
        placed: dict[int, list[str]] = {}
        for depth, needle in sorted(needles, key=lambda item: item[0]):
            target = depth * span
            spot = min(range(len(boundaries)), key=lambda i: (abs(token_positions[i] - target), i))
            placed.setdefault(boundaries[spot], []).append(needle)
        pieces, previous = [], 0
        for boundary in sorted(placed):
            pieces.append(filler[previous:boundary].strip())
            pieces.extend(placed[boundary])
            previous = boundary
        pieces.append(filler[previous:].strip())
        return " ".join(piece for piece in pieces if piece)


def _join_sentences(lines: list[str]) -> tuple[str, list[int]]:
    """A document's lines joined by spaces, with the character where each sentence starts."""
    starts, base = [], 0
    for line in lines:
        starts.append(base)
        starts.extend(base + m.end() for m in _SENTENCE_END.finditer(line) if m.end() < len(line))
        base += len(line) + 1
    return " ".join(lines), starts
