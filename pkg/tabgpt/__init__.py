"""tabgpt: train a GPT in a browser tab, from scratch, in Python.

Layers, bottom up: ``gpu`` (the only code that talks to WebGPU, native or in the
browser), ``shaders/*.wgsl``, ``gpt`` (the model), ``corpus`` and ``bpe`` (data
and tokenizer, no GPU), ``train`` / ``sample`` / ``evaluate``, and the front
ends (``cli`` natively, the page through ``web``).
"""

__version__ = "0.1.0"

import sys

IN_BROWSER = sys.platform == "emscripten"
