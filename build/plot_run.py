"""Draw a run's loss curves (metrics.jsonl) as a small standalone SVG for the blog: train loss per step and
validation loss per evaluation, with the best validation point marked. Standard library only.
Usage: python build/plot_run.py RUN/metrics.jsonl site/assets/loss.svg [--title TEXT]
"""

from __future__ import annotations

import argparse
import json
import math


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    events = [json.loads(line) for line in open(args.metrics) if line.strip()]
    train = sorted({e["step"]: e["loss"] for e in events if e.get("type") == "step"}.items())
    val = sorted({e["step"]: e["val_loss"] for e in events if e.get("type") == "eval"}.items())
    W, H, L, R, T, B = 760, 340, 56, 20, 34, 44
    xmax = max(s for s, _ in train + val)
    ys = [l for _, l in train + val]
    ymin, ymax = math.floor(min(ys)), math.ceil(min(max(ys), 9))
    X = lambda s: L + (W - L - R) * s / xmax  # noqa: E731
    Y = lambda v: T + (H - T - B) * (1 - (min(v, ymax) - ymin) / (ymax - ymin))  # noqa: E731
    # thin the train curve to ~600 points (mean of each bucket) so the SVG stays small
    k = max(1, len(train) // 600)
    pts = [(train[i][0], sum(l for _, l in train[i:i + k]) / len(train[i:i + k])) for i in range(0, len(train), k)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" font-family="system-ui, sans-serif" '
           f'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    for v in range(ymin, ymax + 1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{L - 8}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#6b7280">{v}</text>')
    step = 10 ** int(math.log10(xmax))
    step = step // 2 if xmax / step < 4 else step
    for s in range(0, xmax + 1, step):
        out.append(f'<text x="{X(s):.1f}" y="{H - B + 18}" text-anchor="middle" fill="#6b7280">{s:,}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle" fill="#374151">step</text>')
    out.append(f'<text x="14" y="{(T + H - B) / 2}" transform="rotate(-90 14 {(T + H - B) / 2})" '
               f'text-anchor="middle" fill="#374151">loss (nats per token)</text>')
    out.append('<polyline fill="none" stroke="#4f46e5" stroke-width="1.5" points="'
               + " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in pts) + '"/>')
    out.append('<polyline fill="none" stroke="#f59e0b" stroke-width="2" points="'
               + " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in val) + '"/>')
    bs, bv = min(val, key=lambda p: p[1])
    out.append(f'<circle cx="{X(bs):.1f}" cy="{Y(bv):.1f}" r="5" fill="#f59e0b" stroke="#92400e"/>'
               f'<text x="{X(bs) + 9:.1f}" y="{Y(bv) + 18:.1f}" fill="#92400e">best validation {bv:.3f} '
               f'at step {bs:,}</text>')
    out.append(f'<text x="{L}" y="20" font-weight="600" fill="#111827">{args.title}</text>')
    out.append(f'<line x1="{W - 250}" x2="{W - 226}" y1="16" y2="16" stroke="#4f46e5" stroke-width="2"/>'
               f'<text x="{W - 220}" y="20" fill="#374151">train</text>'
               f'<line x1="{W - 160}" x2="{W - 136}" y1="16" y2="16" stroke="#f59e0b" stroke-width="2"/>'
               f'<text x="{W - 130}" y="20" fill="#374151">validation</text>')
    out.append("</svg>")
    open(args.out, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
