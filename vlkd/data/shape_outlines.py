"""Unit outlines of the drawable shapes: polygons centred on the origin, image axes (y points down)."""

from __future__ import annotations

import math

import numpy as np


def _regular_polygon(corners: int, radius: float, start_degrees: float) -> np.ndarray:
    angles = np.deg2rad(start_degrees + 360.0 * np.arange(corners) / corners)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _centred(points: np.ndarray) -> np.ndarray:
    """Shift so the bounding box is centred: a shape then sits where its position word says."""
    return points - (points.max(axis=0) + points.min(axis=0)) / 2


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    return _centred(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))


def _cross() -> np.ndarray:
    arm, reach = 0.32, 0.95
    quarter = [(arm, -reach), (arm, -arm), (reach, -arm)]
    points = []
    for turn in range(4):
        # Rotating the first quarter by 90 degrees four times traces the whole plus sign.
        cos, sin = round(math.cos(turn * math.pi / 2)), round(math.sin(turn * math.pi / 2))
        points += [(x * cos - y * sin, x * sin + y * cos) for x, y in quarter]
    return np.array(points)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = _centred(np.stack([x, y], axis=1))
    return points / np.abs(points).max()


UNIT_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular_polygon(48, 1.0, 0.0),
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _centred(_regular_polygon(3, 1.15, -90.0)),
    "star": _star(),
    "diamond": np.array([(0.0, -1.1), (0.72, 0.0), (0.0, 1.1), (-0.72, 0.0)]),
    "hexagon": _regular_polygon(6, 1.0, -90.0),
    "cross": _cross(),
    "heart": _heart(),
}

# The farthest any outline reaches from its centre, so a placed shape never leaves the image.
MAX_EXTENT = max(float(np.abs(points).max()) for points in UNIT_OUTLINES.values())
