"""push_t's scripted expert: a greedy quasi-static push planner (see :class:`PushTExpert`)."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.tasks.push_t_geometry import Rect, TGeometry, default_geometry


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
