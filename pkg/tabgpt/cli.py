"""The native command line: `tabgpt <command>` or `python -m tabgpt <command>`.

Commands (see README.md): device, fetch, tokenizer, train, sample, eval.
Each command's work lives in its module; this file only parses flags and prints.
"""

from __future__ import annotations

import argparse
import json
import sys


def check_switches():
    """The on/off environment switches (README), each read by the function that uses it (with its default): a
    value other than 0 or 1 raises GPUError."""
    from tabgpt import gpu
    from tabgpt.ops import attention, layernorm, matmul
    gpu.env_switch("TABGPT_SUBGROUPS")       # (Device.subgroup_reductions: off by default)
    matmul.pairs_enabled()
    matmul.tune_data()                       # TABGPT_AUTOTUNE_DATA: normal or zeros
    matmul.tune_flush()                      # TABGPT_TUNE_FLUSH
    matmul.tune_margin()                     # TABGPT_TUNE_MARGIN: a fraction from 0 to 0.1
    attention.heavy_first_enabled()
    attention.dq_ds_options()                # TABGPT_ATTENTION_DQ_PREFETCH, _DS_VEC4 (and _DQ_KS: 16 or 32)
    layernorm.fold_enabled()


def cmd_device(args) -> int:
    """`tabgpt device`; a GPUError (no adapter, a bad environment switch, a speed measure that cannot run) is an
    `error:` line and exit status 1."""
    from tabgpt import gpu
    try:
        check_switches()    # before the self-test, which would run with some of them only
        return _device(args)
    except gpu.GPUError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _device(args) -> int:
    from tabgpt import gpu, selftest
    from tabgpt.config import PRESETS
    if not args.speed and (args.preset is not None or args.seconds is not None):
        print("error: --preset and --seconds choose what --speed trains: add --speed", file=sys.stderr)
        return 1
    args.preset = "browser" if args.preset is None else args.preset
    args.seconds = 10.0 if args.seconds is None else args.seconds
    if args.speed and args.preset not in PRESETS:
        print(f"error: unknown --preset {args.preset!r}: give one of {', '.join(PRESETS)}", file=sys.stderr)
        return 1
    if args.speed and not (0 < args.seconds < float("inf")):
        print(f"error: --seconds must be a positive number of seconds, got {args.seconds:g}", file=sys.stderr)
        return 1
    dev = gpu.wait(gpu.open_device())      # a GPUError here, or in the speed measure: cmd_device's error line
    res = gpu.wait(selftest.run_selftest(dev))
    cost = gpu.wait(selftest.dispatch_cost(dev))
    ok = res["ok"] and cost["counter_ok"]
    if args.json:
        out = {"info": dev.info, "backend": dev.backend, "features": sorted(dev.features),
               "subgroup_ops": dev.has_subgroup_ops(), "subgroup_reductions": dev.subgroup_reductions(),
               "limits": dev.limits, "selftest": res, "dispatch": cost}
        if args.speed and res["ok"]:
            out["speed"] = speed = _measure_speed(dev, args, quiet=True)
            ok = ok and speed["ok"]
        print(json.dumps(out, indent=1))
        return 0 if ok else 1
    info = dev.info
    print(f"adapter   {info.get('device') or info.get('vendor')}  ({info.get('description', '')})")
    print(f"backend   {dev.backend} / {info.get('backend_type', '')}, type {info.get('adapter_type', '')}")
    print(f"features  {', '.join(sorted(dev.features)) or '(none of shader-f16, subgroups, timestamp-query)'}")
    sg = ("subgroup operations" if dev.subgroup_reductions() else
          "workgroup-memory trees" + (" (subgroup operations available: TABGPT_SUBGROUPS=1)"
                                      if dev.has_subgroup_ops() else ""))
    print(f"reductions {sg}  (layernorm, cross-entropy rows)")
    print("limits")
    for k, v in dev.limits.items():
        print(f"  {k:40s} {v}")
    print("self-test")
    for c in res["checks"]:
        print(f"  {'pass' if c['ok'] else 'FAIL'}  {c['name']:40s} max rel. error {c['max_rel_err']:.2e}"
              f" (tolerance {c['tol']:.0e})")
    print(f"dispatch  {cost['us_per_dispatch']:.1f} us per replayed dispatch ({cost['dispatches']} in a sequence)")
    print("OK" if res["ok"] else "FAILED: this device computes wrong results")
    if args.speed and res["ok"]:
        ok = _measure_speed(dev, args)["ok"] and ok
    return 0 if ok else 1


def _measure_speed(dev, args, quiet: bool = False) -> dict:
    """`tabgpt device --speed`: tabgpt.speed's matrix products and training, printed unless quiet."""
    from tabgpt import gpu, speed

    def status(message):
        if not quiet:
            print(f"  ({message})", file=sys.stderr)
    if not quiet:
        print("speed     the trainer's matrix product, n x n x n f32 (sampled entries checked exactly)")
    matmul = gpu.wait(speed.matmul_speed(dev, post=status))
    for r in matmul:
        if not quiet and "error" in r:
            print(f"  {r['n']:5d}  could not run: {r['error']}")
        elif not quiet:
            print(f"  {r['n']:5d}  {r['ms']:9.3f} ms  {r['gflops']:10,.1f} GFLOP/s  tiles {r['tiles']}, split-K "
                  f"{r['splits']}  {'ok' if r['ok'] else 'WRONG: ' + '; '.join(r['wrong'])}")
    train = gpu.wait(speed.train_speed(dev, args.preset, args.seconds, post=status))
    if not quiet:
        if "error" in train:
            print(f"  training, preset {args.preset}: {train['error']}")
        else:
            print(f"  training, preset {args.preset} ({train['n_params'] / 1e6:.1f} M parameters, "
                  f"{train['tokens_per_step']:,} tokens a step): {train['tokens_per_s']:,.0f} tokens/s, "
                  f"{train['gflops']:,.1f} GFLOP/s, {train['step_ms']:.1f} ms a step over {train['timed_steps']} "
                  f"steps (built in {train['compile_seconds']:.1f} s)")
    ok = all(r["ok"] for r in matmul) and "error" not in train
    return {"matmul": matmul, "train": train, "ok": ok}


def _delegate(module: str, func: str = "cli_main"):
    def run(args) -> int:
        import importlib
        mod = importlib.import_module(f"tabgpt.{module}")
        return getattr(mod, func)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tabgpt", description="Train a GPT on WebGPU, natively or in a browser tab.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("device", help="the WebGPU adapter, its features and limits, and a kernel self-test")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--speed", action="store_true",
                   help="also time the matrix product (square sizes up to 4096) and training at --preset")
    p.add_argument("--preset", help="the preset --speed trains (default: browser)")
    p.add_argument("--seconds", type=float, help="how long --speed trains (default: 10)")
    p.set_defaults(func=cmd_device)

    p = sub.add_parser("fetch", help="get a corpus: the bundled default, Gutenberg books, a URL or a file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--default", action="store_true", help="the bundled default corpus (offline)")
    g.add_argument("--book", nargs="+", metavar="ID",
                   help="Project Gutenberg book ids, or GITenberg repository names such as Pride-and-Prejudice_1342 "
                        "(Gitenberg mirror)")
    g.add_argument("--url", help="any URL of a plain-text file")
    g.add_argument("--file", help="a local text file")
    g.add_argument("--search", metavar="QUERY", help="search the bundled book catalogue and print matches")
    p.add_argument("--out", help="where to write the cleaned corpus (UTF-8 text)")
    p.set_defaults(func=_delegate("corpus"))

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", required=True, help="a text file (for example from `tabgpt fetch`)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="tokenizer.json (Hugging Face format)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_delegate("bpe"))

    p = sub.add_parser("train", help="train a GPT; writes a run folder")
    p.add_argument("--data", required=True, help="a text file, or 'default' for the bundled corpus")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (else one is trained)")
    p.add_argument("--init-from", metavar="FOLDER",
                   help="start from a trained model: a tabgpt run folder or a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors, tokenizer.json); its sizes and tokenizer are kept (fine-tuning)")
    p.add_argument("--preset", default=None, help="tiny (the default), small, browser or gpt2")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (the model's sizes stay; the training "
                        "settings below may change, such as a lower --learning-rate after a divergence)")
    for name, typ in [("n-layer", int), ("n-head", int), ("n-embd", int), ("block-size", int),
                      ("batch-size", int), ("grad-accum", int), ("vocab-size", int), ("learning-rate", float),
                      ("min-lr", float), ("warmup-steps", int), ("max-steps", int), ("weight-decay", float),
                      ("grad-clip", float), ("eval-interval", int), ("eval-steps", int),
                      ("sample-interval", int), ("checkpoint-interval", int), ("seed", int)]:
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_delegate("pipeline", "cli_train"))

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.set_defaults(func=_delegate("sample"))

    p = sub.add_parser("eval", help="evaluate a trained run on held-out text; prints one JSON object")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="held-out text file, or 'default' for the default validation split")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.set_defaults(func=_delegate("evaluate"))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
