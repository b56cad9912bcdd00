"""Evaluation on the CPU, standard library only (runs in Pyodide too).

Loss is only comparable across tokenizers once it is turned into bits per byte of text; the baselines
(gzip, bz2, lzma, a unigram model) say what "good" means for that number. The sample metrics say whether
generated text uses real words and how much it repeats itself. `sample_token` draws the next token from one
row of logits, with temperature, top-k and top-p filtered the way Hugging Face's generate() does.
"""

import math
import random
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from heapq import nlargest
from itertools import accumulate

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------
# loss -> bits per byte

def bits_per_byte(mean_loss_nats_per_token, n_tokens, n_bytes):
    """Total information in bits divided by the text's length in UTF-8 bytes: loss * n_tokens / (n_bytes ln 2).
    Independent of the tokenizer, so models with different vocabularies (and compressors) compare."""
    if n_bytes <= 0:
        raise ValueError("n_bytes must be positive, got %r" % (n_bytes,))
    return mean_loss_nats_per_token * n_tokens / (n_bytes * LN2)


def perplexity(mean_loss):
    """exp(mean loss in nats per token): the effective number of equally likely next tokens."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def _as_bytes(text_or_bytes):
    return text_or_bytes.encode("utf-8") if isinstance(text_or_bytes, str) else bytes(text_or_bytes)


def compression_baselines(text_or_bytes):
    """Bits per byte of the text compressed by gzip, bz2 and lzma at their strongest settings (whole files,
    headers included). A module missing from this Python (lzma may be in the browser) gives None."""
    data = _as_bytes(text_or_bytes)
    if not data:
        raise ValueError("compression_baselines needs a non-empty text")

    def gzip_(d):
        import gzip
        return gzip.compress(d, compresslevel=9, mtime=0)

    def bz2_(d):
        import bz2
        return bz2.compress(d, compresslevel=9)

    def lzma_(d):
        import lzma
        return lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)

    out = {}
    for name, compress_ in (("gzip", gzip_), ("bz2", bz2_), ("lzma", lzma_)):
        try:
            out[name] = 8.0 * len(compress_(data)) / len(data)
        except ImportError:
            out[name] = None
    return out


def unigram_bits_per_byte(train_tokens, eval_tokens, vocab_size, n_eval_bytes):
    """Cross-entropy in bits per byte of a unigram model with add-one (Laplace) smoothing,
    p(t) = (count_train(t) + 1) / (n_train + vocab_size), on the evaluation tokens. The floor any model that
    looks at context must beat."""
    if vocab_size <= 0 or n_eval_bytes <= 0:
        raise ValueError("vocab_size and n_eval_bytes must be positive")
    train_counts = Counter(train_tokens)
    eval_counts = Counter(eval_tokens)
    for t in list(train_counts) + list(eval_counts):
        if not 0 <= t < vocab_size:
            raise ValueError("token id %r outside the vocabulary [0, %d)" % (t, vocab_size))
    log2_denominator = math.log2(sum(train_counts.values()) + vocab_size)
    bits = sum(n * (log2_denominator - math.log2(train_counts[t] + 1)) for t, n in eval_counts.items())
    return bits / n_eval_bytes


# ----------------------------------------------------------------------------------------------------------
# samples

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script): everything else separates words


def words(text):
    """Lowercased words: maximal runs of letters. "Don't stop, Romeo!" -> ['don', 't', 'stop', 'romeo']."""
    return _WORD.findall(text.lower())


def word_set(text):
    """The set of words of a (training) text: build it once, reuse it for every sample."""
    return set(words(text))


def real_word_share(sample_text, training_text_or_wordset):
    """Share of the sample's words (counted with repeats) that occur in the training text. 0.0 for no words."""
    known = training_text_or_wordset
    if isinstance(known, str):
        known = word_set(known)
    ws = words(sample_text)
    if not ws:
        return 0.0
    return sum(w in known for w in ws) / len(ws)


def _ngrams(text, n):
    ws = words(text)
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def repetition_rate(text, n=4):
    """Share of word n-grams that repeat an earlier n-gram of the same text (loops, stuck phrases).
    0.0 when the text has fewer than n words."""
    grams = _ngrams(text, n)
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def distinct_n(text, n=2):
    """Distinct word n-grams / all word n-grams (Li et al., 2016): low means repetitive. 0.0 for no n-grams."""
    grams = _ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------------------------------
# sampling one token on the CPU

NOT_FINITE = ("the model's logits contain NaN or inf: its weights are not finite (a run that diverged, or a corrupt "
              "checkpoint). Sample from an earlier checkpoint, or train again with a lower learning rate")


def check_sampling(max_new_tokens=0, temperature=1.0, top_k=None, top_p=None):
    """Refuse sampling settings that mean nothing (ValueError that says what each takes)."""
    problems = []
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        problems.append(f"temperature must be >= 0 (0 picks the most likely token), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        problems.append(f"top_k must be a whole number >= 0 (0 or none: no cut), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (1 or none: no cut), got {top_p!r}")
    if problems:
        raise ValueError("; ".join(problems))


def sample_token(logits, vocab_size, temperature=1.0, top_k=None, top_p=None, rng=None):
    """Draw a token id from one row of logits (list or array.array of floats, length >= vocab_size).

    Ids >= vocab_size (padding of the embedding table) are never chosen. temperature 0 is argmax (first
    maximum). Otherwise, as Hugging Face's warpers do it: logits / temperature, keep the top_k largest (ties
    with the k-th kept), then keep the smallest set of most likely tokens whose probability reaches top_p
    (nucleus; always at least one; ties at the cut all kept), renormalise, and draw with rng.random()
    (rng: a random.Random, seeded for reproducible samples). The loops run in C where they can (max, sorted,
    accumulate, bisect): a few ms for vocab 50257.
    """
    if not 0 < vocab_size <= len(logits):
        raise ValueError("vocab_size %r must be in [1, len(logits) = %d]" % (vocab_size, len(logits)))
    row = logits[:vocab_size]
    m = float(max(row))
    if m != m or m == math.inf:
        raise ValueError(NOT_FINITE)
    if temperature <= 0:
        return row.index(m)

    ids = range(vocab_size)
    if top_k and top_k < vocab_size:
        kth = nlargest(top_k, row)[-1] if top_k <= 4096 else sorted(row, reverse=True)[top_k - 1]
        ids = [i for i, x in enumerate(row) if x >= kth]  # ties with the k-th are kept, as in HF
        row = [row[i] for i in ids]

    # softmax(logits / T) up to normalisation, shifted by the max so that exp never overflows
    scale = 1.0 / temperature
    exp = math.exp
    weights = [exp((x - m) * scale) for x in row]
    total = sum(weights)
    if not total > 0:  # NaN somewhere, or no mass at all
        raise ValueError(NOT_FINITE)

    if top_p is not None and top_p < 1.0:
        # Keep a token while the mass of the tokens above it is < top_p (HF removes, in ascending order, the
        # tokens whose cumulative probability is <= 1 - top_p). Tokens below `floor` hold less than
        # (1 - top_p) of the mass together, so the cut lies above it: only the rest needs sorting.
        floor = (1.0 - top_p) * total / len(weights) * 0.999
        ordered = sorted([w for w in weights if w >= floor], reverse=True)
        mass_through = list(accumulate(ordered))
        cut = ordered[min(bisect_left(mass_through, top_p * total), len(ordered) - 1)]
        kept = [j for j, w in enumerate(weights) if w >= cut]
        ids = [ids[j] for j in kept]
        weights = [weights[j] for j in kept]

    cumulative = list(accumulate(weights))
    i = bisect_right(cumulative, (rng or random).random() * cumulative[-1])
    return ids[min(i, len(ids) - 1)]
