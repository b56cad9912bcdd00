"""tabgpt: train a GPT in a browser tab, from scratch, in Python.

Layers, bottom up: ``gpu`` (the only code that talks to WebGPU, native or in the
browser), ``shaders/*.wgsl``, ``gpt`` (the model), ``corpus`` and ``bpe`` (data
and tokenizer, no GPU), ``train`` / ``sample`` / ``evaluate``, and the front
ends (``cli`` natively, the page through ``web``).
"""

__version__ = "0.1.0"

import sys

IN_BROWSER = sys.platform == "emscripten"


def run_main(main):
    """asyncio.run(main) for the command line, where Ctrl+C interrupts at once. asyncio's own handler cancels the
    task at its next real suspension, which work that never waits (training the tokenizer, compiling kernels,
    the native GPU calls) does not reach: a Ctrl+C used to wait for the whole command. Training installs its own
    handler while it runs (stop with a checkpoint)."""
    import asyncio
    import signal
    import threading

    async def interruptible():
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return await main

    return asyncio.run(interruptible())
