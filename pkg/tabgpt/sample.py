"""Generation: prefill the prompt, then one token at a time with the keys and values cached on the GPU.

The logits of the last position come back to the CPU (one row of padded_vocab_size floats) and
tabgpt.metrics.sample_token picks the next token (temperature, top-k, top-p, seeded). Text streams out
as complete UTF-8 characters: a token that ends inside a multi-byte character waits for the next one.
"""

from __future__ import annotations

import codecs
import random
import sys
import time

from tabgpt.metrics import check_sampling, sample_token


async def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                   top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_at_eot: bool = True,
                   should_stop=None):
    """Yield the generated text piece by piece (the prompt itself is not repeated); should_stop() true ends it
    early (the page's Stop)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    rng = random.Random(seed)
    cfg = model.cfg
    ids = list(tokenizer.encode(prompt)) if prompt else []
    if not ids:
        ids = [tokenizer.eot_id]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    window = ids[-cfg.block_size:]
    logits = await model.prefill(window)
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            break
        tok = sample_token(logits, cfg.vocab_size, temperature, top_k, top_p, rng)
        if stop_at_eot and tok == tokenizer.eot_id:
            break
        text = decoder.decode(tokenizer.decode_bytes([tok]))
        if text:
            yield text
        window.append(tok)
        if len(window) >= cfg.block_size:
            # The context is full: keep the most recent half and prefill again (rare, and keeps quality).
            window = window[-max(1, cfg.block_size // 2):]
            logits = await model.prefill(window)
        else:
            logits = await model.decode(tok)
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def cli_main(args) -> int:
    import tabgpt
    from tabgpt import gpu
    from tabgpt.run import RunError, RunFolder, load_model

    async def main():
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)   # before the model loads
        dev = await gpu.open_device()
        cfg, tok, model, step = await load_model(dev, RunFolder(args.run), B=1)
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} (seed {args.seed + i})")
            sys.stdout.write(args.prompt)
            t0, n = time.perf_counter(), 0
            async for piece in generate(model, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                        args.top_p, seed=args.seed + i):
                sys.stdout.write(piece)
                sys.stdout.flush()
                n += 1
            sys.stdout.write("\n")
            print(f"[{n} pieces in {time.perf_counter() - t0:.1f} s, step {step}]", file=sys.stderr)

    try:
        tabgpt.run_main(main())
    except (RunError, ValueError, gpu.GPUError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
