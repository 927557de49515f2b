"""The chosen allocation drawn per layer and per group, like the rate-distortion paper's
figure 9: one panel per timestep group, one bar per layer (module order), its height the
weight bits the layer computes with in that group and its colour the input's precision.

Drawn with Pillow (a dependency of the runtime already), so every export can carry it.
"""

from __future__ import annotations

from pathlib import Path

from calibration.allocation import FLOAT, Choice

HEIGHTS = {4: 1, 8: 2, FLOAT: 4}  # bar height units for int4, int8 and float weights
COLOURS = {8: (76, 114, 176), FLOAT: (221, 132, 82)}  # int8 input, float input
PANEL, BAR, LEFT, TOP = 120, 6, 50, 40


def draw(choices: dict[str, Choice], kinds: dict[str, str], groups: list[list[int]],
         timesteps: list[int], path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw

    names = list(choices)
    width = LEFT + BAR * len(names) + 20
    height = TOP + (PANEL + 30) * len(groups) + 40
    image = Image.new("RGB", (max(width, 520), height), "white")
    pen = ImageDraw.Draw(image)
    pen.text((LEFT, 6), title, fill="black")
    unit = (PANEL - 10) / HEIGHTS[FLOAT]
    for g, steps in enumerate(groups):
        base = TOP + (PANEL + 30) * g + PANEL
        pen.text((LEFT, base - PANEL - 14), f"group {g}: timesteps {timesteps[steps[0]]}-"
                 f"{timesteps[steps[-1]]} ({len(steps)} steps)", fill="black")
        for bits, label in ((4, "w4"), (8, "w8"), (FLOAT, "fp32")):
            y = base - HEIGHTS[bits] * unit
            pen.line((LEFT - 4, y, width - 16, y), fill=(225, 225, 225))
            pen.text((8, y - 6), label, fill="black")
        for i, name in enumerate(names):
            choice = choices[name]
            x = LEFT + BAR * i
            top = base - HEIGHTS[choice.weights_in(kinds[name], g)] * unit
            pen.rectangle((x, top, x + BAR - 2, base), fill=COLOURS[choice.activations[g]])
        pen.line((LEFT - 4, base, width - 16, base), fill="black")
    y = height - 30
    pen.text((LEFT, y), "bar: weight bits the layer computes with; colour: input", fill="black")
    for i, (bits, label) in enumerate(((8, "int8 input"), (FLOAT, "float input"))):
        x = LEFT + 330 + 110 * i
        pen.rectangle((x, y, x + 10, y + 10), fill=COLOURS[bits])
        pen.text((x + 14, y), label, fill="black")
    pen.text((LEFT, y + 14), f"layers in module order: {names[0]} ... {names[-1]}",
             fill="black")
    image.save(path)
    return path
