"""One-off: group of four (separate bindings, f63000b) under variants, against one product of the same FLOPs."""
import sys
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pkg"))
from tabgpt import gpu  # noqa
from tabgpt.gpu import wait  # noqa
from tabgpt.ops.matmul import Matmul, MatmulGroup, tiles_label  # noqa
from common import best_seconds  # noqa

K, C = 8192, 384
LAYER = [(4 * C, C), (C, 4 * C), (C, 3 * C), (C, C)]
dev = wait(gpu.open_device())
rng = np.random.default_rng(0)
def bufs(shapes):
    return [(dev.buffer(4 * (m + 1) * n, "o"), dev.buffer(4 * K * m, "a", rng.standard_normal(K * m, dtype=np.float32)),
             dev.buffer(4 * K * n, "b", rng.standard_normal(K * n, dtype=np.float32))) for m, n in shapes]
arms = {}
for label, shapes, bias_row, fixed in [
        ("layer, bias_row", LAYER, True, {}),
        ("layer, no bias_row", LAYER, False, {}),
        ("4 x 384x1152, no bias_row", [(C, 3 * C)] * 4, False, {}),
        ("layer, bias_row, 128x128x8 s6", LAYER, True, dict(tiles={"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True, "DOUBLE_BUFFER": True}, splits=6)),
        ("4 x 384x1152, 128x128x8 s6", [(C, 3 * C)] * 4, False, dict(tiles={"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True, "DOUBLE_BUFFER": True}, splits=6))]:
    g = wait(MatmulGroup.create(dev, shapes, K, bias_row=bias_row, **fixed))
    ops = bufs(shapes)
    seq = dev.sequence(label)
    g.dispatch(seq, ops)
    wait(seq.build())
    arms[label] = (seq, f"{tiles_label(g.tiles)}, {g.splits}", [])
for label, fixed in [("one 384x4608", {}), ("one 384x4608, 128x128x8 s6", dict(tiles={"BM": 128, "BN": 128, "BK": 8, "TM": 8, "TN": 8, "SPREAD": True, "PREFETCH": True, "DOUBLE_BUFFER": True}, splits=6))]:
    m = wait(Matmul.create(dev, C, 12 * C, K, "tn", accumulate=True, **fixed))
    (o, a, b), = bufs([(C, 12 * C)])
    seq = dev.sequence(label)
    m.dispatch(seq, out=o, a=a, b=b)
    wait(seq.build())
    arms[label] = (seq, f"{tiles_label(m.tiles)}, {m.splits}", [])
for _ in range(5):
    for seq, _, t in arms.values():
        t.append(best_seconds(seq.run, lambda: wait(dev.sync()), 3, 0.05))
print("| form | tiles, splits | ms |\n| --- | --- | ---: |")
for label, (_, tl, t) in arms.items():
    print(f"| {label} | {tl} | {min(t) * 1e3:.4f} |")
