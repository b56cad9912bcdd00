"""Evaluation on held-out text: loss, perplexity, bits per byte, top-1 accuracy, and baselines on the same text.

Bits per byte compare across tokenizers: the summed loss in bits over the text's UTF-8 bytes. Baselines:
gzip, bz2 and lzma at their strongest settings, and a unigram model of the training tokens. For samples: the
share of generated words that occur in the training text and the rate of repeated 4-grams.
"""

from __future__ import annotations

import array
import json
import math
import sys
import time

from tabgpt import metrics


async def evaluate(model, tokenizer, text: str, train_text: str | None = None, train_tokens=None,
                   samples: list[str] | None = None, max_tokens: int | None = None) -> dict:
    t0 = time.perf_counter()
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a whole number >= 1 (or none: the whole text), got {max_tokens!r}")
    ids = array.array("I", tokenizer.encode(text))
    if max_tokens and len(ids) > max_tokens + 1:
        ids = ids[:max_tokens + 1]
        text = tokenizer.decode(ids)
    B, T = model.B, model.T
    if len(ids) < 2:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    # Non-overlapping windows of T tokens cover the text exactly once (the last one shorter), so every token
    # after the first is scored once and bits per byte cover the whole text.
    total_loss, n_tok, n_correct = 0.0, 0, 0
    windows = [(i, min(T, len(ids) - 1 - i)) for i in range(0, len(ids) - 1, T)]
    batch = []
    for start, length in windows:
        batch.append((start, length))
        if len(batch) == B:
            l, n, c = await _score(model, ids, batch, B, T)
            total_loss, n_tok, n_correct = total_loss + l, n_tok + n, n_correct + c
            batch = []
    if batch:
        l, n, c = await _score(model, ids, batch, B, T)
        total_loss, n_tok, n_correct = total_loss + l, n_tok + n, n_correct + c
    scored_bytes = len(tokenizer.decode_bytes(ids[1:1 + n_tok]))
    mean = total_loss / n_tok
    if not math.isfinite(mean):
        raise ValueError(f"the model's loss on this text is {mean}: its weights are not finite (a run that "
                         f"diverged, or a corrupt checkpoint). Evaluate an earlier checkpoint, or train again with a "
                         f"lower learning rate")
    out = {
        "val_loss": mean,
        "perplexity": metrics.perplexity(mean),
        "bits_per_byte": metrics.bits_per_byte(mean, n_tok, scored_bytes),
        "top1": n_correct / n_tok,
        "tokens": n_tok,
        "bytes": scored_bytes,
        "bytes_per_token": scored_bytes / n_tok,
        "baselines": metrics.compression_baselines(text.encode()),
    }
    if train_tokens is not None:
        out["unigram_bits_per_byte"] = metrics.unigram_bits_per_byte(train_tokens, ids[1:1 + n_tok],
                                                                     model.cfg.vocab_size, scored_bytes)
    if samples and train_text:
        words = metrics.word_set(train_text)
        joined = "\n".join(samples)
        out["real_word_share"] = metrics.real_word_share(joined, words)
        out["repetition_rate"] = sum(metrics.repetition_rate(s) for s in samples) / len(samples)
    out["seconds"] = time.perf_counter() - t0
    return out


async def _score(model, ids, windows, B, T):
    """Score up to B consecutive windows of T tokens laid out as rows (only the last may be shorter)."""
    x = array.array("I")
    y = array.array("I")
    for start, length in windows:
        x.extend(ids[start:start + length])
        y.extend(ids[start + 1:start + 1 + length])
    return await model.eval_metrics(x, y)


def cli_main(args) -> int:
    import tabgpt
    from tabgpt import gpu
    from tabgpt.run import RunError, RunFolder, load_model

    async def main():
        run = RunFolder(args.run)
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1 (leave it out for the whole text), got "
                             f"{args.max_tokens}")
        if args.data == "default":
            from tabgpt.corpus import load_corpus
            c = await load_corpus("default")
            text, train_text = c.val_text, c.train_text
        else:
            try:
                raw = open(args.data, "rb").read()
            except OSError as e:
                raise RunError(f"cannot read {args.data}: {e.strerror}") from e
            from tabgpt.corpus import decode_bytes
            text, _, notice = decode_bytes(raw, args.data)
            if notice:
                print(f"note: {notice}", file=sys.stderr)
            train_text = None
        dev = await gpu.open_device()
        cfg, tok, model, step = await load_model(dev, run, B=8)
        train_tokens = array.array("I", tok.encode(train_text)) if train_text else None
        res = await evaluate(model, tok, text, train_text=train_text, train_tokens=train_tokens,
                             max_tokens=args.max_tokens)
        res["step"] = step
        print(json.dumps(res))

    from tabgpt.corpus import CorpusError
    try:
        tabgpt.run_main(main())
    except (RunError, ValueError, CorpusError, gpu.GPUError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
