"""push_t — planar pushing of a T-shaped block onto a goal pose (Diffusion Policy's PushT, in MuJoCo).

A round pusher moves on a table and pushes a T-shaped block (a 120 x 30 mm bar on a 30 x 90 mm stem)
until it covers a fixed goal T drawn on the table (the centre, rotated pi/4, as in PushT).

Scene (metres, +x right and +y up in the ``top`` image): the pusher's reachable square is
|x|, |y| <= 0.25 (PushT's 512 px at ~1 mm per px); the block's frame origin is the middle of the
bar's lower edge, where the stem joins it, and its angle is 0 when the bar is on top (stem along -y).

Action (2,): the pusher's **target position**, ``action * 0.25`` m (absolute, like PushT). Stiff,
critically damped position actuators bring the pusher there in ~0.1 s, at most 0.6 m/s per axis.
Absolute targets are what Diffusion Policy learns PushT with: an action says where to be, so errors
do not integrate over a chunk, and a target near the current position is a slow, careful move.

Physics: the block slides on three planar joints whose viscous damping stands in for floor friction
(quasi-static: it stops ~0.03 s after the pusher lets go, and never drifts); pusher-block friction is
low (0.05), so a push acts along the contact normal and the block's response is predictable.
Episodes start with the block anywhere in |x|, |y| <= 0.15 at any angle but covering <= 30% of the
goal, and the pusher anywhere in |x|, |y| <= 0.22 clear of the block.

State observation (6,) float32::

    [0:2] pusher x, y
    [2:4] block origin x, y
    [4:6] cos(block angle), sin(block angle)   (continuous, unlike PushT's raw angle)

Coverage = area(block T ∩ goal T) / area(goal T), computed exactly from the two T polygons (each T
is two rectangles with disjoint interiors, so it is a sum of four convex clippings). Reward is
PushT's ``min(coverage / 0.95, 1)``; success (and termination) when coverage >= 0.95.
``info["coverage"]`` is reported every step. Control at 10 Hz (timestep 0.01 s x 10 substeps).

The scripted expert (:class:`PushTExpert`) is a greedy quasi-static push planner, see its docstring.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import numpy as np

from envs.base import ASSETS, MujocoTaskEnv
from envs.registry import TaskSpec, register_task

XML_FILE = "push_t.xml"
SUCCESS_COVERAGE = 0.95
BLOCK_GEOMS = ("block_bar", "block_stem")
GOAL_GEOMS = ("goal_bar", "goal_stem")
# Initial state: block origin uniform in this square, angle uniform; pusher uniform in its square.
BLOCK_INIT_HALF_RANGE = 0.15
PUSHER_INIT_HALF_RANGE = 0.22
MAX_INITIAL_COVERAGE = 0.3  # resample block poses that already overlap the goal this much
# PushT's own limit (300 steps at 10 Hz). The expert's 95th-percentile episode is 80 steps, but it
# needs millimetre precision: with 7.5 mm of noise on its executed targets (exec_noise=0.03) it
# succeeds in 42% of episodes within 110 steps and 98% within 300 (median 115 steps, p95 239), and a
# learnt policy is less precise than that (scripts/analysis/, issue H).
MAX_EPISODE_STEPS = 300

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


# ---- env ------------------------------------------------------------------------------------
class PushTEnv(MujocoTaskEnv):
    """Push the T-shaped block until it covers >= 95% of the goal T."""

    xml_file: ClassVar[str] = XML_FILE
    state_dim: ClassVar[int] = 6
    action_dim: ClassVar[int] = 2

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.geometry = geometry_from_model(self.model)
        # Slide/hinge joints measure from the bodies' MJCF poses, which sit at the world origin.
        self._block_adr = [int(self.model.joint(j).qposadr[0]) for j in ("block_x", "block_y", "block_yaw")]
        self._pusher_adr = [int(self.model.joint(j).qposadr[0]) for j in ("pusher_x", "pusher_y")]
        self._coverage_key: Pose | None = None
        self._coverage_value = 0.0
        # Finite state bounds: targets keep the pusher in the workspace (it does not overshoot), and
        # a pushed block's origin stays within a pusher radius plus a T's reach (0.092 m) beyond it.
        pusher_high, block_high = self.geometry.workspace + 0.05, self.geometry.workspace + 0.25
        high = np.array([pusher_high, pusher_high, block_high, block_high, 1.0, 1.0], dtype=np.float32)
        self.observation_space["state"] = gym.spaces.Box(-high, high, dtype=np.float32)

    # ---- task hooks -------------------------------------------------------------------------
    def initialize_episode(self, rng: np.random.Generator) -> None:
        while True:
            xy = rng.uniform(-BLOCK_INIT_HALF_RANGE, BLOCK_INIT_HALF_RANGE, size=2)
            pose = (float(xy[0]), float(xy[1]), float(rng.uniform(-math.pi, math.pi)))
            if coverage(pose, self.geometry) <= MAX_INITIAL_COVERAGE:
                break
        while True:
            pusher = rng.uniform(-PUSHER_INIT_HALF_RANGE, PUSHER_INIT_HALF_RANGE, size=2)
            if distance_to_t(pusher, pose, self.geometry) > self.geometry.pusher_radius + 0.01:
                break
        self.data.qpos[self._block_adr] = pose
        self.data.qpos[self._pusher_adr] = pusher
        self.data.ctrl[:] = pusher  # start at rest: the actuators hold the initial position

    def apply_action(self, action: np.ndarray) -> None:
        self.data.ctrl[:] = action * self.geometry.workspace

    def get_state(self) -> np.ndarray:
        x, y, angle = self.block_pose
        pusher = self.data.qpos[self._pusher_adr]
        return np.array([pusher[0], pusher[1], x, y, math.cos(angle), math.sin(angle)], dtype=np.float32)

    def get_reward(self) -> float:
        return min(self.coverage / SUCCESS_COVERAGE, 1.0)

    def is_success(self) -> bool:
        return self.coverage >= SUCCESS_COVERAGE

    def task_info(self) -> dict[str, Any]:
        return {"coverage": self.coverage}

    # ---- physics accessors ------------------------------------------------------------------
    @property
    def block_pose(self) -> Pose:
        q = self.data.qpos
        return (float(q[self._block_adr[0]]), float(q[self._block_adr[1]]), float(q[self._block_adr[2]]))

    @property
    def coverage(self) -> float:
        # reward, success and info all ask for it each step; compute it once per block pose.
        pose = self.block_pose
        if pose != self._coverage_key:
            self._coverage_key, self._coverage_value = pose, coverage(pose, self.geometry)
        return self._coverage_value


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


# ---- scripted expert ------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertParams:
    rot_scale: float = 0.05  # metres per radian when weighing angle against position errors
    contact_spacing: float = 0.004  # candidate contact points along the T's outline
    corner_margin: float = 0.004  # no contacts this close to a convex corner (they slip off)
    clearance: float = 0.006  # gap kept between pusher and block while travelling around it
    travel_step: float = 0.03  # max target offset per control step while travelling (m)
    approach_step: float = 0.012  # ... while closing in on a contact
    push_step: float = 0.015  # ... while pushing
    push_gain: float = 0.8  # fraction of the error-optimal push depth commanded per step
    slide_step: float = 0.006  # max sliding along a face per step while pushing
    travel_cost: float = 1.0  # alignment lost per metre of travel when choosing a contact
    keep_margin: float = 0.15  # a new contact must beat the current one by this much alignment
    min_alignment: float = 0.15  # stop pushing at a contact once it helps less than this
    # Seeded per-step noise on contact scores. 0 by default: a fresh draw every step made the action
    # depend on something no observation shows (issue H: it more than doubled the gap to a state-only
    # expert, 0.6 -> 1.5 mm per step); demonstrations vary through the initial states instead.
    score_noise: float = 0.0
    # Re-derive every decision (the contact travelled to, the way round for the angle) from the
    # current state each step, so the action is a function of the observation a policy sees. With
    # False the expert keeps them from earlier steps (hysteresis): same success (100% either way over
    # 100 seeds), but the action then depends on hidden state.
    stateless: bool = True


@dataclass(frozen=True)
class _Contacts:
    """Candidate contact points on the T's outline, in the block frame."""

    point: np.ndarray  # (N, 2) on the surface
    normal: np.ndarray  # (N, 2) outward unit normal
    face: np.ndarray  # (N,) face id: 4 * rect index + side
    twist: np.ndarray  # (N, 3) block (vx, vy, omega) per metre the pusher advances along -normal


def _inside(point: tuple[float, float], rect: Rect, pad: float) -> bool:
    cx, cy, hx, hy = rect
    return abs(point[0] - cx) < hx + pad and abs(point[1] - cy) < hy + pad


def _candidate_contacts(geo: TGeometry, params: ExpertParams) -> _Contacts:
    r = geo.pusher_radius
    points, normals, faces = [], [], []
    for index, (cx, cy, hx, hy) in enumerate(geo.rects):
        # Faces: +x, -x, +y, -y with their tangent half-length.
        for side, (nx, ny, half) in enumerate(((1, 0, hy), (-1, 0, hy), (0, 1, hx), (0, -1, hx))):
            count = int(2 * (half - params.corner_margin) / params.contact_spacing) + 1
            for t in np.linspace(-(half - params.corner_margin), half - params.corner_margin, count):
                px = cx + nx * hx + (0.0 if nx else float(t))
                py = cy + ny * hy + (0.0 if ny else float(t))
                # The pusher's centre when touching must be clear of the other rectangles: this
                # drops the faces inside the T and the inner corners the pusher cannot reach.
                centre = (px + nx * r, py + ny * r)
                if any(_inside(centre, other, r + 0.001) for j, other in enumerate(geo.rects) if j != index):
                    continue
                points.append((px, py))
                normals.append((nx, ny))
                faces.append(4 * index + side)
    point, normal = np.array(points), np.array(normals, dtype=np.float64)
    # Quasi-static response to a frictionless push along -normal: velocity = damping^-1 * force.
    push = -normal
    torque = point[:, 0] * push[:, 1] - point[:, 1] * push[:, 0]
    dx, dy, dyaw = geo.damping
    twist = np.stack([push[:, 0] / dx, push[:, 1] / dy, torque / dyaw], axis=1)
    # Normal speed of the contact point per unit force; scale so the pusher advance is 1 m.
    normal_speed = push[:, 0] ** 2 / dx + push[:, 1] ** 2 / dy + torque**2 / dyaw
    return _Contacts(point, normal, np.array(faces), twist / normal_speed[:, None])


def _segment_hits_rect(a: tuple[float, float], b: tuple[float, float], rect: Rect, pad: float) -> bool:
    """Whether segment a-b passes through the interior of ``rect`` grown by ``pad`` (Liang-Barsky)."""
    cx, cy, hx, hy = rect
    lo, hi = 0.0, 1.0
    for axis, centre, half in ((0, cx, hx + pad), (1, cy, hy + pad)):
        start, delta = a[axis] - centre, b[axis] - a[axis]
        if abs(delta) < 1e-12:
            if abs(start) >= half:
                return False
            continue
        t0, t1 = (-half - start) / delta, (half - start) / delta
        lo, hi = max(lo, min(t0, t1)), min(hi, max(t0, t1))
        if lo >= hi:
            return False
    return hi - lo > 1e-9


class PushTExpert:
    """A greedy quasi-static push planner with obstacle-aware repositioning.

    Each step it predicts, for every candidate contact point on the T's outline, how the block would
    move per metre of pushing there (block joint damping as a linear limit surface, frictionless
    contact), and scores each by how well that motion points along the pose error (position plus
    ``rot_scale`` x angle). It keeps pushing at the current face (sliding along it towards that face's
    best point) while that face still helps; otherwise it picks the best contact, discounted by
    distance, and travels there along the shortest path around the block's outline grown by the
    pusher radius (a visibility graph over the grown rectangles' corners), then approaches along the
    contact normal. Push depth is the error-optimal step along the predicted motion, so the block
    settles onto the goal instead of overshooting.

    By default (``ExpertParams.stateless``, no ``score_noise``) the action is a deterministic function
    of the current state observation; the hysteresis on the chosen contact only comes from the state
    itself (a contact the pusher is close to scores higher through its travel cost).
    """

    def __init__(self, seed: int = 0, params: ExpertParams | None = None) -> None:
        self.params = params or ExpertParams()
        self.geo = default_geometry()
        self.contacts = _candidate_contacts(self.geo, self.params)
        self._rng = np.random.default_rng(seed)
        pad = self.geo.pusher_radius + self.params.clearance
        self._grown = [(cx, cy, hx + pad, hy + pad) for cx, cy, hx, hy in self.geo.rects]
        # Travel nodes: corners of the grown rectangles that are not inside another one.
        nodes = []
        for cx, cy, hx, hy in self._grown:
            for sx in (-1.0, 1.0):
                for sy in (-1.0, 1.0):
                    corner = (cx + sx * (hx + 0.002), cy + sy * (hy + 0.002))
                    if not any(_inside(corner, rect, 0.0) for rect in self._grown):
                        nodes.append(corner)
        self._nodes = nodes
        # Where each contact is approached from: along its normal, just outside the grown outline.
        entry = self.contacts.point + self.contacts.normal * (pad + 0.003)
        ok = [not any(_inside((float(p[0]), float(p[1])), rect, 0.0) for rect in self._grown) for p in entry]
        self._entry = entry
        self._approachable = np.array(ok)
        self._target: int | None = None  # index of the contact being travelled to or pushed at
        self._angle_sign = 0.0  # the way round chosen for the angle error; 0 = not chosen yet

    # ---- per step ---------------------------------------------------------------------------
    def __call__(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        if "steps" not in info:
            raise KeyError("PushTExpert needs info['steps'] (0 on the first step of an episode)")
        if int(info["steps"]) == 0 or self.params.stateless:
            self._target = None
            self._angle_sign = 0.0
        state = np.asarray(obs["state"], dtype=np.float64)
        pusher_w = state[0:2]
        x, y, angle = float(state[2]), float(state[3]), math.atan2(float(state[5]), float(state[4]))
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s], [s, c]])  # block frame -> world
        origin = np.array([x, y])
        pusher = rot.T @ (pusher_w - origin)  # pusher in the block frame

        target_b = self._plan(pusher, origin, angle, rot)
        target_w = origin + rot @ target_b
        action: np.ndarray = np.clip(target_w / self.geo.workspace, -1.0, 1.0).astype(np.float32)
        return action

    def _error(self, origin: np.ndarray, angle: float, rot: np.ndarray) -> np.ndarray:
        """Pose error (goal - block) in the block frame: (dx, dy, dangle)."""
        gx, gy, ga = self.geo.goal
        d_angle = (ga - angle + math.pi) % (2.0 * math.pi) - math.pi
        # Near +-pi the shorter way round flips from step to step; keep the way chosen earlier.
        if abs(d_angle) > 0.85 * math.pi and d_angle * self._angle_sign < 0.0:
            d_angle += 2.0 * math.pi * self._angle_sign
        else:
            self._angle_sign = 1.0 if d_angle >= 0.0 else -1.0
        d_pos = rot.T @ (np.array([gx, gy]) - origin)
        return np.array([d_pos[0], d_pos[1], d_angle])

    def _plan(self, pusher: np.ndarray, origin: np.ndarray, angle: float, rot: np.ndarray) -> np.ndarray:
        p = self.params
        cts = self.contacts
        r = self.geo.pusher_radius
        error = self._error(origin, angle, rot)
        weight = np.array([1.0, 1.0, p.rot_scale**2])
        gain = cts.twist @ (weight * error)  # (N,) error reduction rate per metre of push
        twist_norm = np.sqrt((cts.twist**2) @ weight)
        error_norm = math.sqrt(float(error**2 @ weight)) + 1e-12
        alignment = gain / (twist_norm * error_norm)
        depth = np.clip(p.push_gain * gain / twist_norm**2, 0.0, None)  # optimal advance (m)

        # Contacts the pusher can reach: approach entry and contact centre inside the workspace.
        centre = cts.point + cts.normal * r
        reach = self.geo.workspace - 0.002
        centre_w = origin + centre @ rot.T
        entry_w = origin + self._entry @ rot.T
        usable = self._approachable & np.all(np.abs(centre_w) < reach, axis=1)
        usable &= np.all(np.abs(entry_w) < reach, axis=1)

        # In contact with a face? (pusher centre within a few mm of touching it, facing it)
        offset = pusher[None, :] - cts.point
        along_normal = np.sum(offset * cts.normal, axis=1)
        tangent = np.stack([-cts.normal[:, 1], cts.normal[:, 0]], axis=1)
        along_tangent = np.sum(offset * tangent, axis=1)
        touching = (np.abs(along_normal - r) < 0.004) & (np.abs(along_tangent) < p.contact_spacing)
        noise = self._rng.normal(0.0, p.score_noise, size=alignment.shape)
        distance = np.linalg.norm(centre - pusher[None, :], axis=1)
        score = np.where(usable, alignment - p.travel_cost * distance + noise, -np.inf)
        best = int(np.argmax(score))

        if touching.any():
            face = int(cts.face[int(np.argmax(touching))])
            on_face = (cts.face == face) & usable
            if on_face.any():
                face_score = np.where(on_face, alignment, -np.inf)
                here = int(np.argmax(face_score))
                if alignment[here] > p.min_alignment and alignment[here] >= score[best] - p.keep_margin:
                    self._target = here
                    return self._push(pusher, here, float(depth[here]))

        # Travel nodes must lie where the pusher can go (the workspace clips every target).
        nodes_w = origin + np.array(self._nodes) @ rot.T
        nodes = [n for n, ok in zip(self._nodes, np.all(np.abs(nodes_w) < reach, axis=1), strict=True) if ok]
        # Keep travelling to the chosen contact unless another one has become clearly better.
        target = self._target
        if target is None or not usable[target] or score[target] < score[best] - p.keep_margin:
            target = best
        for _ in range(8):
            step = self._go_to_contact(pusher, target, nodes)
            if step is not None:
                self._target = target
                return step
            score[target] = -np.inf  # no way round the block inside the workspace
            target = int(np.argmax(score))
        self._target = None
        return pusher  # nothing reachable now; hold still

    def _push(self, pusher: np.ndarray, index: int, depth: float) -> np.ndarray:
        p = self.params
        normal = self.contacts.normal[index]
        surface = self.contacts.point[index] + normal * self.geo.pusher_radius
        # Slide along the face towards the chosen point while pressing in by the push depth.
        slide = surface - pusher
        slide -= normal * float(slide @ normal)
        length = float(np.linalg.norm(slide))
        if length > p.slide_step:
            slide *= p.slide_step / length
        press = min(depth, p.push_step)
        # Onto the surface (normal part of surface - pusher), then press in along -normal.
        target: np.ndarray = pusher + slide + float((surface - pusher) @ normal) * normal - normal * press
        return target

    def _go_to_contact(
        self, pusher: np.ndarray, index: int, nodes: list[tuple[float, float]]
    ) -> np.ndarray | None:
        p = self.params
        normal = self.contacts.normal[index]
        point = self.contacts.point[index]
        entry = self._entry[index]
        surface = point + normal * self.geo.pusher_radius
        offset = pusher - point
        lateral = float(offset @ np.array([-normal[1], normal[0]]))
        height = float(offset @ normal)
        entry_height = float((entry - point) @ normal)
        if abs(lateral) < 0.003 and self.geo.pusher_radius - 0.003 < height < entry_height + 0.004:
            # In the approach corridor: close in along the normal, slowly near the surface.
            return self._step_towards(pusher, surface, p.approach_step)
        if any(_inside((float(pusher[0]), float(pusher[1])), rect, -1e-4) for rect in self._grown):
            return self._retreat(pusher)
        path = self._shortest_path(
            (float(pusher[0]), float(pusher[1])), (float(entry[0]), float(entry[1])), nodes
        )
        if path is None:
            return None
        return self._step_towards(pusher, np.array(path[1]), p.travel_step)

    @staticmethod
    def _step_towards(start: np.ndarray, goal: np.ndarray, max_step: float) -> np.ndarray:
        delta = goal - start
        length = float(np.linalg.norm(delta))
        return goal if length <= max_step else start + delta * (max_step / length)

    def _retreat(self, pusher: np.ndarray) -> np.ndarray:
        """Nearest way out of the grown outline (straight out through a rectangle's side)."""
        best, best_cost = pusher, math.inf
        for cx, cy, hx, hy in self._grown:
            if not _inside((float(pusher[0]), float(pusher[1])), (cx, cy, hx, hy), 0.0):
                continue
            for exit_point in (
                (cx + hx + 0.003, pusher[1]),
                (cx - hx - 0.003, pusher[1]),
                (pusher[0], cy + hy + 0.003),
                (pusher[0], cy - hy - 0.003),
            ):
                if any(_inside(exit_point, rect, 0.0) for rect in self._grown):
                    continue
                cost = math.hypot(exit_point[0] - pusher[0], exit_point[1] - pusher[1])
                if cost < best_cost:
                    best, best_cost = np.array(exit_point, dtype=np.float64), cost
        return self._step_towards(pusher, best, self.params.travel_step)

    def _visible(self, a: tuple[float, float], b: tuple[float, float]) -> bool:
        return not any(_segment_hits_rect(a, b, rect, -1e-4) for rect in self._grown)

    def _shortest_path(
        self, start: tuple[float, float], goal: tuple[float, float], nodes: list[tuple[float, float]]
    ) -> list[tuple[float, float]] | None:
        """Dijkstra over start, goal and ``nodes``, joined by straight segments clear of the block."""
        if self._visible(start, goal):
            return [start, goal]
        points = [start, goal, *nodes]
        dist = [math.inf] * len(points)
        prev = [-1] * len(points)
        dist[0] = 0.0
        queue = [(0.0, 0)]
        while queue:
            d, i = heapq.heappop(queue)
            if d > dist[i]:
                continue
            if i == 1:
                break
            for j in range(1, len(points)):
                if j == i or not self._visible(points[i], points[j]):
                    continue
                nd = d + math.hypot(points[j][0] - points[i][0], points[j][1] - points[i][1])
                if nd < dist[j]:
                    dist[j], prev[j] = nd, i
                    heapq.heappush(queue, (nd, j))
        if prev[1] < 0:
            return None
        path, i = [], 1
        while i >= 0:
            path.append(points[i])
            i = prev[i]
        return path[::-1]


def make_expert(seed: int = 0) -> PushTExpert:
    """The expert; the seed only matters with ``score_noise`` > 0 (its stream runs on across episodes)."""
    return PushTExpert(seed)


SPEC = TaskSpec(
    name="push_t",
    entry_point="envs.tasks.push_t:PushTEnv",
    expert_entry_point="envs.tasks.push_t:make_expert",
    state_dim=PushTEnv.state_dim,
    action_dim=PushTEnv.action_dim,
    fps=PushTEnv.fps,
    max_episode_steps=MAX_EPISODE_STEPS,
    success="coverage of the goal T >= 95%",
    cameras=("top",),
    tags=("own", "pusht"),
    episode_metrics=("coverage",),
)
register_task(SPEC)
