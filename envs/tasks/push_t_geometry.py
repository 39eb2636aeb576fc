"""push_t's geometry: the T (two rectangles), its goal pose, and exact coverage, read from the MJCF.

Shared by the env (reward, success) and the scripted expert (its planner) — the one source of the
scene's shapes. Units are metres; a pose is the (x, y, angle) of the T's frame origin, the middle of
the bar's lower edge, angle 0 with the bar on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mujoco
import numpy as np

from envs.base import ASSETS

XML_FILE = "push_t.xml"
BLOCK_GEOMS = ("block_bar", "block_stem")
GOAL_GEOMS = ("goal_bar", "goal_stem")

Rect = tuple[float, float, float, float]  # (centre x, centre y, half width, half height), body frame
Pose = tuple[float, float, float]  # (x, y, angle) of a T's frame origin in the world


# ---- geometry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TGeometry:
    """Everything about the scene the env and the expert need, read from the MJCF (one source)."""

    rects: tuple[Rect, ...]  # the T as rectangles with disjoint interiors, in the block frame
    goal: Pose
    pusher_radius: float
    workspace: float  # half side of the square the pusher's target may be in
    damping: tuple[float, float, float]  # block joint damping: x, y (N s/m), yaw (N m s/rad)

    @property
    def area(self) -> float:
        return sum(4.0 * hx * hy for _, _, hx, hy in self.rects)


def _yaw(quat: np.ndarray) -> float:
    # Rotation about +z only: q = (cos(a/2), 0, 0, sin(a/2)).
    return 2.0 * math.atan2(float(quat[3]), float(quat[0]))


def geometry_from_model(model: mujoco.MjModel) -> TGeometry:
    def rects(names: tuple[str, ...]) -> tuple[Rect, ...]:
        out = []
        for name in names:
            geom = model.geom(name)
            if int(geom.type[0]) != mujoco.mjtGeom.mjGEOM_BOX:
                raise ValueError(f"{XML_FILE}: geom {name!r} must be a box")
            out.append((float(geom.pos[0]), float(geom.pos[1]), float(geom.size[0]), float(geom.size[1])))
        return tuple(out)

    block, goal_rects = rects(BLOCK_GEOMS), rects(GOAL_GEOMS)
    if not np.allclose(block, goal_rects):
        raise ValueError(f"{XML_FILE}: goal geoms {goal_rects} must match the block geoms {block}")
    goal_body = model.body("goal")
    dofs = [int(model.joint(name).dofadr[0]) for name in ("block_x", "block_y", "block_yaw")]
    return TGeometry(
        rects=block,
        goal=(float(goal_body.pos[0]), float(goal_body.pos[1]), _yaw(goal_body.quat)),
        pusher_radius=float(model.geom("pusher").size[0]),
        workspace=float(model.actuator("pusher_x").ctrlrange[1]),
        damping=(
            float(model.dof_damping[dofs[0]]),
            float(model.dof_damping[dofs[1]]),
            float(model.dof_damping[dofs[2]]),
        ),
    )


@lru_cache(maxsize=1)
def default_geometry() -> TGeometry:
    return geometry_from_model(mujoco.MjModel.from_xml_path(str(ASSETS / XML_FILE)))


def _world_corners(rect: Rect, pose: Pose) -> list[tuple[float, float]]:
    cx, cy, hx, hy = rect
    x, y, angle = pose
    c, s = math.cos(angle), math.sin(angle)
    corners = []
    for px, py in ((cx - hx, cy - hy), (cx + hx, cy - hy), (cx + hx, cy + hy), (cx - hx, cy + hy)):
        corners.append((x + c * px - s * py, y + s * px + c * py))
    return corners


def _clip(poly: list[tuple[float, float]], axis: int, sign: float, bound: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: keep the part of ``poly`` where ``sign * p[axis] <= bound``."""
    out: list[tuple[float, float]] = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        dp, dq = sign * p[axis] - bound, sign * q[axis] - bound
        if dp <= 0.0:
            out.append(p)
        if (dp < 0.0 < dq) or (dq < 0.0 < dp):
            t = dp / (dp - dq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _polygon_area(poly: list[tuple[float, float]]) -> float:
    area = 0.0
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        area += x0 * y1 - x1 * y0
    return 0.5 * abs(area)


def _rect_intersection_area(rect_a: Rect, pose_a: Pose, rect_b: Rect, pose_b: Pose) -> float:
    """Area of the intersection of two posed rectangles, exact (convex clipping in b's frame)."""
    cx, cy, hx, hy = rect_b
    xb, yb, angle_b = pose_b
    c, s = math.cos(angle_b), math.sin(angle_b)
    # Centre of b in the world, then a's corners expressed relative to b, axis-aligned.
    bx, by = xb + c * cx - s * cy, yb + s * cx + c * cy
    poly = [
        (c * (px - bx) + s * (py - by), -s * (px - bx) + c * (py - by))
        for px, py in _world_corners(rect_a, pose_a)
    ]
    for axis, bound in ((0, hx), (1, hy)):
        poly = _clip(poly, axis, 1.0, bound)
        if not poly:
            return 0.0
        poly = _clip(poly, axis, -1.0, bound)
        if not poly:
            return 0.0
    return _polygon_area(poly)


def coverage(block_pose: Pose, geometry: TGeometry | None = None) -> float:
    """Fraction of the goal T's area covered by the block T at ``block_pose``, in [0, 1]."""
    geo = geometry or default_geometry()
    # Both T's are unions of interior-disjoint rectangles, so the overlap is the sum over pairs.
    reach = max(math.hypot(cx, cy) + math.hypot(hx, hy) for cx, cy, hx, hy in geo.rects)
    if math.hypot(block_pose[0] - geo.goal[0], block_pose[1] - geo.goal[1]) >= 2.0 * reach:
        return 0.0
    overlap = sum(_rect_intersection_area(a, block_pose, b, geo.goal) for a in geo.rects for b in geo.rects)
    return min(overlap / geo.area, 1.0)


def distance_to_t(point: np.ndarray, pose: Pose, geometry: TGeometry) -> float:
    """Euclidean distance from a world point to the T at ``pose`` (0 inside)."""
    x, y, angle = pose
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = float(point[0]) - x, float(point[1]) - y
    px, py = c * dx + s * dy, -s * dx + c * dy
    best = math.inf
    for cx, cy, hx, hy in geometry.rects:
        ox, oy = max(abs(px - cx) - hx, 0.0), max(abs(py - cy) - hy, 0.0)
        best = min(best, math.hypot(ox, oy))
    return best
