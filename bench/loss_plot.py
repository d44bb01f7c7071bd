"""Loss curves as an SVG line chart, with the standard library only (the CPU machine has no
matplotlib, and text comes back from the device where images may not).

Usage: python3 bench/loss_plot.py TRAIN_LOOP_JSON OUT_SVG   (the JSON bench/train_loop.py writes)
"""

import json
import sys

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 45
COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def svg(curves, title):
    """An SVG document plotting each curve (label -> losses per step) against the step."""
    steps = max(len(values) for values in curves.values())
    low = min(min(values) for values in curves.values())
    high = max(max(values) for values in curves.values())
    span = (high - low) or 1.0

    def x(step):
        return LEFT + (WIDTH - LEFT - RIGHT) * step / max(steps - 1, 1)

    def y(value):
        return TOP + (HEIGHT - TOP - BOTTOM) * (high - value) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for tick in range(6):
        value = low + span * tick / 5
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
    for tick in range(5):
        step = round((steps - 1) * tick / 4)
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{step + 1}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle">step</text>')
    parts.append(f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" '
                 f'text-anchor="middle">cross-entropy</text>')
    for index, (label, values) in enumerate(curves.items()):
        colour = COLOURS[index % len(COLOURS)]
        points = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in enumerate(values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-opacity="0.8" points="{points}"/>')
        legend_y = TOP + 10 + 16 * index
        parts.append(f'<line x1="{WIDTH - 170}" x2="{WIDTH - 150}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}"/>')
        parts.append(f'<text x="{WIDTH - 144}" y="{legend_y + 4}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def title_of(report, name):
    return (f"{name}: {report['layers']} layers, B {report['batch']} x S {report['seq_len']}, "
            f"AdamW lr {report['lr']}")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as file:
        report = json.load(file)
    name = report["library"].rstrip("/").split("/")[-1]
    with open(sys.argv[2], "w") as file:
        file.write(svg(report["curves"], title_of(report, name)))


if __name__ == "__main__":
    main()
