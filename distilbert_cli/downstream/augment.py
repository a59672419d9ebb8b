"""Data augmentation for task-specific distillation: the transfer set is every training example followed by up to
N altered copies of it, deterministic given the seed (each example draws from its own generator, seeded with
(seed, example index)). The label is never changed; special tokens written in a text are never touched.

Words are the tokenizer's own (its pre-tokenizer's words: BERT's split at spaces and punctuation), located by
character offsets, so a word made of several pieces is replaced as a whole and everything between words (spaces,
punctuation) stays as written.

- `tinybert` (Jiao et al. 2020; the released data_augmentation.py): each letters-only word that is not a stop word
  (scikit-learn's English list; the code uses NLTK's) gets up to K candidates: a single-piece word, the whole-word
  tokens among the masked LM's top-K predictions at its position with the word masked; a word of several pieces, its
  K nearest whole-word tokens by cosine similarity in the masked LM's input-embedding space to the mean of its
  pieces' embeddings (the code: GloVe neighbours). Each copy replaces each such word, with probability p, by one of
  its candidates drawn uniformly. Deviations: the word itself is never a candidate (so p is the replacement rate; in
  the code the masked LM's top prediction is often the word itself), and the masked LM sees the example with the
  word masked (the code appends the unmasked sentence as a second segment).
- `tang` (Tang et al. 2019): each word becomes the mask token with probability p_mask; then, with probability
  p_ng, the text is cut to a random n-gram of its words (n uniform in 1..max_ngram). Left out: the part-of-speech
  guided replacement (p_pos), which needs a part-of-speech tagger this package does not depend on.

Copies identical to the example or to an earlier copy are dropped (both papers keep distinct examples only).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from distilbert_cli.tasks.base import TEXT_COLUMNS
from distilbert_cli.training.batches import derived_seed
from distilbert_cli.training.distiller import MaskedLMRows

log = logging.getLogger(__name__)

# Examples whose masked-LM passes run together (their words' passes are batched by augment.batch_size).
_EXAMPLES_PER_CHUNK = 256


@dataclass(frozen=True)
class Word:
    text: int  # 0: the example's first text (sentence1), 1: its second (sentence2)
    start: int  # character span in that text
    end: int
    positions: tuple[int, ...]  # its token positions in the encoded example


@dataclass
class Augmented:
    """The transfer set's rows before tokenization, and what augmentation did."""

    rows: dict[str, list]  # the task's columns (sentence1, [sentence2], label), plus origin and augmented
    drawn: int = 0  # copies drawn
    duplicates: int = 0  # copies dropped as identical to the example or to an earlier copy
    candidate_words: int = 0  # words that could be replaced (tinybert)
    words: int = 0  # words of the examples


def example_words(tokenizer, texts: Sequence[Sequence[str]], max_length: int) -> tuple[list[list[int]],
                                                                                        list[list[Word]]]:
    """The encoded examples ([CLS] a [SEP] [b [SEP]], cut to `max_length` tokens) and the words of each (tokens
    that share a word id), leaving out words that hold a special token."""
    encoded = tokenizer(*texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    all_words = []
    for row, ids in enumerate(encoded["input_ids"]):
        groups: dict[tuple[int, int], list[int]] = {}
        for position, (text, word) in enumerate(zip(encoded.sequence_ids(row), encoded.word_ids(row), strict=True)):
            if text is not None and word is not None:
                groups.setdefault((text, word), []).append(position)
        offsets = encoded["offset_mapping"][row]
        all_words.append([Word(text, offsets[positions[0]][0], offsets[positions[-1]][1], tuple(positions))
                          for (text, _), positions in groups.items()
                          if not special.intersection(ids[p] for p in positions)])
    return encoded["input_ids"], all_words


def splice(text: str, words: Sequence[Word], replacements: dict[int, str]) -> tuple[str, list[tuple[int, int]]]:
    """`text` with its word i (of `words`, the words of this text in order) replaced by replacements[i], and every
    word's span in the result."""
    pieces, spans, cursor, shift = [], [], 0, 0
    for index, word in enumerate(words):
        new = replacements.get(index, text[word.start:word.end])
        pieces += [text[cursor:word.start], new]
        start = word.start + shift
        spans.append((start, start + len(new)))
        shift += len(new) - (word.end - word.start)
        cursor = word.end
    pieces.append(text[cursor:])
    return "".join(pieces), spans


def by_text(words: Sequence[Word], count: int) -> list[list[int]]:
    """The indices (into `words`) of the words of each of the example's `count` texts, in order."""
    return [[index for index, word in enumerate(words) if word.text == text] for text in range(count)]


def matched_case(candidate: str, word: str) -> str:
    """A candidate written as the word is: Title or UPPER case kept (uncased models predict lower case)."""
    if word.isupper() and len(word) > 1:
        return candidate.upper()
    return candidate.title() if word.istitle() else candidate


def whole_words(tokenizer) -> dict[int, str]:
    """Vocabulary ids that are a whole word of two letters or more, tokenized alone as that id: {id: word} (single
    letters are mostly the pieces a word-piece vocabulary spells rare words with)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    strings = [tokenizer.convert_tokens_to_string([token]) for token in tokenizer.convert_ids_to_tokens(ids)]
    found = {}
    encoded = tokenizer(strings, add_special_tokens=False)["input_ids"]
    for token_id, string, alone in zip(ids, strings, encoded, strict=True):
        if len(string.strip()) > 1 and string.strip().isalpha() and alone == [token_id]:
            found[token_id] = string.strip()
    return found


class Augmentor(ABC):
    """Draws the copies of an example from its candidate words (what a method may put in place of each word)."""

    def __init__(self, settings, tokenizer, seed: int, max_length: int):
        self.settings, self.tokenizer, self.seed, self.max_length = settings, tokenizer, seed, max_length

    def augment(self, examples: dict[str, list]) -> Augmented:
        """Each example followed by its distinct copies: columns sentence1 (sentence2), label, origin (the index of
        the example the row comes from) and augmented."""
        texts = [examples[name] for name in TEXT_COLUMNS if name in examples]
        result = Augmented({**{name: [] for name in examples}, "origin": [], "augmented": []})
        count = len(examples["label"])
        with tqdm(total=count, desc=f"augment ({self.settings.method})", unit="example") as progress:
            for start in range(0, count, _EXAMPLES_PER_CHUNK):
                chunk = range(start, min(start + _EXAMPLES_PER_CHUNK, count))
                chunk_texts = [[column[i] for i in chunk] for column in texts]
                input_ids, words = example_words(self.tokenizer, chunk_texts, self.max_length)
                candidates = self.candidates(input_ids, words, chunk_texts)
                for offset, index in enumerate(chunk):
                    own = [column[offset] for column in chunk_texts]
                    self._add(result, examples, index, own, words[offset], candidates[offset])
                    progress.update()
        log.info("augment=%s: %d examples, %d copies drawn, %d kept (%d duplicates dropped); %d words%s",
                 self.settings.method, count, result.drawn, result.drawn - result.duplicates, result.duplicates,
                 result.words, f", {result.candidate_words} with candidates" if result.candidate_words else "")
        return result

    def _add(self, result: Augmented, examples: dict, index: int, texts: list[str], words: list[Word],
             candidates: list[list[str]]) -> None:
        rng = np.random.default_rng(derived_seed(self.seed, index))
        seen = {tuple(texts)}
        copies = []
        for _ in range(self.settings.copies):
            copy = self.copy(texts, words, candidates, rng)
            result.drawn += 1
            if copy in seen:
                result.duplicates += 1
                continue
            seen.add(copy)
            copies.append(copy)
        result.words += len(words)
        result.candidate_words += sum(1 for found in candidates if found)
        for row, copy in enumerate([tuple(texts), *copies]):
            for name, value in zip(TEXT_COLUMNS, copy, strict=False):
                result.rows[name].append(value)
            for name in examples:
                if name not in TEXT_COLUMNS:
                    result.rows[name].append(examples[name][index])
            result.rows["origin"].append(index)
            result.rows["augmented"].append(row > 0)

    @abstractmethod
    def candidates(self, input_ids: list[list[int]], words: list[list[Word]], texts: list[list[str]]
                   ) -> list[list[list[str]]]:
        """For each example of a chunk (`texts`: one list per text column), each word's candidates ([] for a word
        the method leaves alone)."""

    @abstractmethod
    def copy(self, texts: list[str], words: list[Word], candidates: list[list[str]], rng) -> tuple[str, ...]:
        """One copy of an example's texts, drawn with `rng`."""


class TinyBertAugmentor(Augmentor):
    def __init__(self, settings, tokenizer, seed: int, max_length: int, masked_lm):
        super().__init__(settings, tokenizer, seed, max_length)
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        self.stop_words = ENGLISH_STOP_WORDS
        self.model = MaskedLMRows(masked_lm.eval())
        self.words = whole_words(tokenizer)
        word_ids = torch.tensor(sorted(self.words))
        embeddings = masked_lm.get_input_embeddings().weight.detach().float()
        self.neighbour_ids = word_ids
        self.neighbour_vectors = torch.nn.functional.normalize(embeddings[word_ids], dim=-1)
        self.embeddings = embeddings

    def replaceable(self, text: str, word: Word) -> bool:
        written = text[word.start:word.end]
        return written.isalpha() and written.lower() not in self.stop_words

    def candidates(self, input_ids, words, texts):
        found: list[list[list[str]]] = [[[] for _ in example] for example in words]
        masked = []  # (example, word index, masked input ids, position)
        for row, example in enumerate(words):
            for index, word in enumerate(example):
                written = texts[word.text][row][word.start:word.end]
                if not self.replaceable(texts[word.text][row], word):
                    continue
                if len(word.positions) == 1:
                    ids = list(input_ids[row])
                    ids[word.positions[0]] = self.tokenizer.mask_token_id
                    masked.append((row, index, ids, word.positions[0]))
                else:
                    pieces = self.embeddings[[input_ids[row][p] for p in word.positions]].mean(0)
                    similarity = self.neighbour_vectors @ torch.nn.functional.normalize(pieces, dim=0)
                    best = self.neighbour_ids[similarity.topk(self.settings.candidates).indices].tolist()
                    found[row][index] = self._words(best, written)
        for row, index, predicted in self._predictions(masked):
            written = texts[words[row][index].text][row][words[row][index].start:words[row][index].end]
            found[row][index] = self._words(predicted, written)
        return found

    def _words(self, token_ids: list[int], written: str) -> list[str]:
        """The whole words among `token_ids`, in order, without the word itself, in its case."""
        return [matched_case(self.words[i], written) for i in token_ids
                if i in self.words and self.words[i].lower() != written.lower()]

    @torch.no_grad()
    def _predictions(self, masked: list) -> list[tuple[int, int, list[int]]]:
        """The masked LM's top-K token ids at each masked word, batched by length."""
        found = []
        order = sorted(range(len(masked)), key=lambda i: len(masked[i][2]))
        for start in range(0, len(order), self.settings.batch_size):
            batch = [masked[i] for i in order[start:start + self.settings.batch_size]]
            width = max(len(ids) for _, _, ids, _ in batch)
            input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, (_, _, ids, _) in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention_mask[i, :len(ids)] = 1
            rows = torch.tensor([i * width + position for i, (_, _, _, position) in enumerate(batch)])
            logits = self.model(input_ids, attention_mask, rows)["logits"]
            top = logits.topk(self.settings.candidates, dim=-1).indices.tolist()
            found += [(row, index, predicted) for (row, index, _, _), predicted in zip(batch, top, strict=True)]
        return found

    def copy(self, texts, words, candidates, rng):
        chosen = {index: options[rng.integers(len(options))] for index, options in enumerate(candidates)
                  if options and rng.random() < self.settings.replace_probability}
        return tuple(splice(text, [words[i] for i in own], {n: chosen[i] for n, i in enumerate(own) if i in chosen})[0]
                     for text, own in zip(texts, by_text(words, len(texts)), strict=True))


class TangAugmentor(Augmentor):
    def candidates(self, input_ids, words, texts):
        return [[[self.tokenizer.mask_token] for _ in example] for example in words]

    def copy(self, texts, words, candidates, rng):
        result = []
        for text, own in zip(texts, by_text(words, len(texts)), strict=True):
            masked = {n: candidates[i][0] for n, i in enumerate(own) if rng.random() < self.settings.mask_probability}
            spliced, spans = splice(text, [words[i] for i in own], masked)
            if own and rng.random() < self.settings.ngram_probability:
                n = int(rng.integers(1, self.settings.max_ngram + 1))
                if n < len(own):
                    first = int(rng.integers(0, len(own) - n + 1))
                    spliced = spliced[spans[first][0]:spans[first + n - 1][1]]
            result.append(spliced)
        return tuple(result)


def augmentor(settings, tokenizer, seed: int, max_length: int, masked_lm=None) -> Augmentor | None:
    """The augmentation `settings` (an `augment` config section) asks for; None for augment=none."""
    if settings.method == "none":
        return None
    if settings.method == "tinybert":
        return TinyBertAugmentor(settings, tokenizer, seed, max_length, masked_lm)
    return TangAugmentor(settings, tokenizer, seed, max_length)
