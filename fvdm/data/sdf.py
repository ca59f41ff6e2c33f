"""Analytic signed-distance primitives, rigid transforms and CSG in numpy (negative inside).

A shape is a small tree of frozen dataclasses; ``shape(p)`` maps float64 points [P, 3] to distances [P], and
``to_dict`` / :func:`shape_from_dict` make the tree JSON-describable so that the generator parameters of a
procedural shape can be stored in its ``meta.json``.

Exactness. Every primitive is an exact Euclidean SDF. A rigid transform with uniform scale keeps exactness
(the distance is multiplied by the scale). CSG by min/max is always *exactly signed* (the sign is the true
inside/outside) and Lipschitz-1, so ``|f|`` never exceeds the true distance, but the magnitude is exact only:
  * outside a union (min) of children that are exact outside,
  * inside an intersection (max) of children that are exact inside,
  * inside a difference ``a - b`` when ``a`` is exact inside and ``b`` exact outside;
elsewhere it is a lower bound. ``exact_inside`` / ``exact_outside`` report this per node. An offset of a bound
is not exactly signed, so :class:`Shell` (``|f| - t/2``) only accepts children that are exact on both sides.
Every node is 1-Lipschitz (exact distances, their min/max, |f| - t, similarities), which lets callers bound the
field away from the surface from a coarse grid (see ``fvdm.data.synth.grid_values``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

BBox = tuple[np.ndarray, np.ndarray]  # (lo [3], hi [3]); +-inf for unbounded sets


def _length(a: np.ndarray) -> np.ndarray:
    """Row norms of [P, 3] -> [P] (einsum: several times faster than a sum reduction over a short axis)."""
    return np.sqrt(np.einsum("ij,ij->i", a, a))


def _max3(a: np.ndarray) -> np.ndarray:
    """Row maxima of [P, 3] -> [P] (elementwise, much faster than max(axis=-1) over a short axis)."""
    return np.maximum(np.maximum(a[:, 0], a[:, 1]), a[:, 2])


def _box(p: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Exact SDF of the box with half extents ``half`` at the origin."""
    q = np.abs(p) - half  # [P, 3]
    return _length(np.maximum(q, 0.0)) + np.minimum(_max3(q), 0.0)


def _vec3(v: Any, name: str) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (3,) or not np.isfinite(a).all():
        raise ValueError(f"{name} must be 3 finite numbers, got {v!r}")
    return tuple(float(x) for x in a)


def _positive(x: Any, name: str) -> float:
    x = float(x)
    if not (np.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a positive number, got {x!r}")
    return x


class Shape:
    """Base of every SDF node: call with points [P, 3] to get signed distances [P]."""

    type: ClassVar[str]
    exact_inside: ClassVar[bool] = True
    exact_outside: ClassVar[bool] = True

    def __call__(self, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bbox(self) -> BBox:
        """A box containing the shape (conservative, not necessarily tight)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Shape):
                d[f.name] = v.to_dict()
            elif isinstance(v, tuple) and v and isinstance(v[0], Shape):
                d[f.name] = [c.to_dict() for c in v]
            elif isinstance(v, tuple):
                d[f.name] = [list(r) if isinstance(r, tuple) else r for r in v]
            else:
                d[f.name] = v
        return d


def _sym_bbox(half: tuple[float, float, float]) -> BBox:
    h = np.asarray(half)
    return -h, h.copy()


# ----------------------------------------------------------------------------------------------- primitives


@dataclass(frozen=True)
class Sphere(Shape):
    """Sphere of ``radius`` at the origin."""

    type: ClassVar[str] = "sphere"
    radius: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", _positive(self.radius, "sphere radius"))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return _length(p) - self.radius

    def bbox(self) -> BBox:
        return _sym_bbox((self.radius,) * 3)


@dataclass(frozen=True)
class Box(Shape):
    """Axis-aligned box with half extents ``half``; a thin plate is a box with one small half extent."""

    type: ClassVar[str] = "box"
    half: tuple[float, float, float]

    def __post_init__(self) -> None:
        half = _vec3(self.half, "box half extents")
        if min(half) <= 0:
            raise ValueError(f"box half extents must be positive, got {half}")
        object.__setattr__(self, "half", half)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return _box(p, np.asarray(self.half))

    def bbox(self) -> BBox:
        return _sym_bbox(self.half)


@dataclass(frozen=True)
class RoundBox(Shape):
    """Box with half extents ``half`` (outer) whose edges and corners are rounded with ``radius``."""

    type: ClassVar[str] = "round_box"
    half: tuple[float, float, float]
    radius: float

    def __post_init__(self) -> None:
        half = _vec3(self.half, "round_box half extents")
        r = _positive(self.radius, "round_box radius")
        if min(half) <= r:
            raise ValueError(f"round_box radius {r} must be below every half extent {half}")
        object.__setattr__(self, "half", half)
        object.__setattr__(self, "radius", r)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return _box(p, np.asarray(self.half) - self.radius) - self.radius

    def bbox(self) -> BBox:
        return _sym_bbox(self.half)


@dataclass(frozen=True)
class Cylinder(Shape):
    """Capped cylinder around the z axis: ``radius``, z in [-half_height, half_height]."""

    type: ClassVar[str] = "cylinder"
    radius: float
    half_height: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", _positive(self.radius, "cylinder radius"))
        object.__setattr__(self, "half_height", _positive(self.half_height, "cylinder half_height"))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        dr = np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - self.radius
        dz = np.abs(p[:, 2]) - self.half_height
        return np.sqrt(np.maximum(dr, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2) + np.minimum(np.maximum(dr, dz), 0.0)

    def bbox(self) -> BBox:
        return _sym_bbox((self.radius, self.radius, self.half_height))


@dataclass(frozen=True)
class Capsule(Shape):
    """Capsule around the z axis: segment z in [-half_length, half_length] swept by a ball of ``radius``."""

    type: ClassVar[str] = "capsule"
    half_length: float
    radius: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "half_length", _positive(self.half_length, "capsule half_length"))
        object.__setattr__(self, "radius", _positive(self.radius, "capsule radius"))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        q = p.copy()
        q[:, 2] -= np.clip(p[:, 2], -self.half_length, self.half_length)
        return _length(q) - self.radius

    def bbox(self) -> BBox:
        return _sym_bbox((self.radius, self.radius, self.half_length + self.radius))


@dataclass(frozen=True)
class Torus(Shape):
    """Torus in the xy plane: tube of radius ``minor`` around a circle of radius ``major``."""

    type: ClassVar[str] = "torus"
    major: float
    minor: float

    def __post_init__(self) -> None:
        major, minor = _positive(self.major, "torus major"), _positive(self.minor, "torus minor")
        if minor >= major:
            raise ValueError(f"torus minor radius {minor} must be below the major radius {major}")
        object.__setattr__(self, "major", major)
        object.__setattr__(self, "minor", minor)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        dr = np.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - self.major
        return np.sqrt(dr**2 + p[:, 2] ** 2) - self.minor

    def bbox(self) -> BBox:
        r = self.major + self.minor
        return _sym_bbox((r, r, self.minor))


@dataclass(frozen=True)
class HalfSpace(Shape):
    """The half-space dot(p, normal) <= offset (unbounded; use it to cut, inside an intersection or difference)."""

    type: ClassVar[str] = "half_space"
    normal: tuple[float, float, float]
    offset: float

    def __post_init__(self) -> None:
        n = np.asarray(_vec3(self.normal, "half_space normal"))
        norm = np.linalg.norm(n)
        if norm == 0:
            raise ValueError("half_space normal must be non-zero")
        object.__setattr__(self, "normal", tuple(float(x) for x in n / norm))
        object.__setattr__(self, "offset", float(self.offset))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return p @ np.asarray(self.normal) - self.offset

    def bbox(self) -> BBox:
        return np.full(3, -np.inf), np.full(3, np.inf)


# ---------------------------------------------------------------------------------- thin walls and transforms


@dataclass(frozen=True)
class Shell(Shape):
    """Thin wall of full ``thickness`` centred on the child's surface: |f| - thickness / 2 (exact if f is)."""

    type: ClassVar[str] = "shell"
    child: Shape
    thickness: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "thickness", _positive(self.thickness, "shell thickness"))
        if not (self.child.exact_inside and self.child.exact_outside):
            raise ValueError(f"shell needs a child whose SDF is exact on both sides, got '{self.child.type}'"
                             " (the offset of a distance bound is not exactly signed)")

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.abs(self.child(p)) - self.thickness / 2

    def bbox(self) -> BBox:
        lo, hi = self.child.bbox()
        return lo - self.thickness / 2, hi + self.thickness / 2


@dataclass(frozen=True)
class Transform(Shape):
    """The child scaled uniformly by ``scale``, then rotated by ``rotation`` (3x3), then moved by ``translation``.

    f(p) = scale * child(R^T (p - t) / scale): exact whenever the child is, since the map is a similarity.
    """

    type: ClassVar[str] = "transform"
    child: Shape
    rotation: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def __post_init__(self) -> None:
        r = np.asarray(self.rotation, dtype=np.float64)
        if r.shape != (3, 3) or not np.isfinite(r).all():
            raise ValueError(f"transform rotation must be a finite 3x3 matrix, got {self.rotation!r}")
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-9) or np.linalg.det(r) < 0:
            raise ValueError("transform rotation must be a proper rotation (orthonormal, det +1)")
        object.__setattr__(self, "rotation", tuple(tuple(float(x) for x in row) for row in r))
        object.__setattr__(self, "translation", _vec3(self.translation, "transform translation"))
        object.__setattr__(self, "scale", _positive(self.scale, "transform scale"))

    @property
    def exact_inside(self) -> bool:  # type: ignore[override]
        return self.child.exact_inside

    @property
    def exact_outside(self) -> bool:  # type: ignore[override]
        return self.child.exact_outside

    def __call__(self, p: np.ndarray) -> np.ndarray:
        # rows: R^T (p - t) / s; einsum keeps this off multithreaded BLAS, which oversubscribes data workers
        local = np.einsum("ij,jk->ik", p - np.asarray(self.translation), np.asarray(self.rotation) / self.scale)
        return self.scale * self.child(local)

    def bbox(self) -> BBox:
        lo, hi = self.child.bbox()
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            return np.full(3, -np.inf), np.full(3, np.inf)
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T  # [8, 3]
        world = self.scale * corners @ np.asarray(self.rotation).T + np.asarray(self.translation)
        return world.min(axis=0), world.max(axis=0)


# ------------------------------------------------------------------------------------------------------- CSG


def _children(children: Any, name: str) -> tuple[Shape, ...]:
    c = tuple(children)
    if not c or not all(isinstance(x, Shape) for x in c):
        raise ValueError(f"{name} needs one or more child shapes")
    return c


@dataclass(frozen=True)
class Union(Shape):
    """min over children: exact outside (if every child is), a lower bound inside."""

    type: ClassVar[str] = "union"
    children: tuple[Shape, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children(self.children, "union"))

    @property
    def exact_inside(self) -> bool:  # type: ignore[override]
        return len(self.children) == 1 and self.children[0].exact_inside

    @property
    def exact_outside(self) -> bool:  # type: ignore[override]
        return all(c.exact_outside for c in self.children)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.minimum.reduce([c(p) for c in self.children])

    def bbox(self) -> BBox:
        boxes = [c.bbox() for c in self.children]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class Intersection(Shape):
    """max over children: exact inside (if every child is), a lower bound outside."""

    type: ClassVar[str] = "intersection"
    children: tuple[Shape, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _children(self.children, "intersection"))

    @property
    def exact_inside(self) -> bool:  # type: ignore[override]
        return all(c.exact_inside for c in self.children)

    @property
    def exact_outside(self) -> bool:  # type: ignore[override]
        return len(self.children) == 1 and self.children[0].exact_outside

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.maximum.reduce([c(p) for c in self.children])

    def bbox(self) -> BBox:
        boxes = [c.bbox() for c in self.children]
        return np.max([b[0] for b in boxes], axis=0), np.min([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class Difference(Shape):
    """``a`` minus ``b``: max(f_a, -f_b); exact inside if a is exact inside and b exact outside."""

    type: ClassVar[str] = "difference"
    a: Shape
    b: Shape

    def __post_init__(self) -> None:
        if not (isinstance(self.a, Shape) and isinstance(self.b, Shape)):
            raise ValueError("difference needs two child shapes 'a' and 'b'")

    @property
    def exact_inside(self) -> bool:  # type: ignore[override]
        return self.a.exact_inside and self.b.exact_outside

    @property
    def exact_outside(self) -> bool:  # type: ignore[override]
        return False

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.maximum(self.a(p), -self.b(p))

    def bbox(self) -> BBox:
        return self.a.bbox()


# ----------------------------------------------------------------------------------------- (de)serialization

NODES: dict[str, type[Shape]] = {
    c.type: c for c in (Sphere, Box, RoundBox, Cylinder, Capsule, Torus, HalfSpace, Shell, Transform,
                        Union, Intersection, Difference)
}


def shape_from_dict(d: dict[str, Any]) -> Shape:
    """Rebuild a shape tree from :meth:`Shape.to_dict` output; ValueError naming the bad node."""
    if not isinstance(d, dict) or d.get("type") not in NODES:
        raise ValueError(f"not a shape node (unknown or missing 'type'; known: {sorted(NODES)}): {d!r:.200}")
    cls = NODES[d["type"]]
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names - {"type"}
    if unknown:
        raise ValueError(f"shape node '{d['type']}' has unknown fields {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name in names & set(d):
        v = d[name]
        if name in ("child", "a", "b"):
            v = shape_from_dict(v)
        elif name == "children":
            v = tuple(shape_from_dict(c) for c in v)
        elif name == "rotation":
            v = tuple(tuple(r) for r in v)
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"shape node '{d['type']}': {e}") from e


def evaluate(shape: Shape, points: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """SDF of [P, 3] points in chunks (bounded memory for dense grids) -> [P] float64."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty(len(p))
    for s in range(0, len(p), chunk):
        out[s : s + chunk] = shape(p[s : s + chunk])
    return out


def gradient(shape: Shape, points: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient [P, 3] of the SDF at [P, 3] points."""
    p = np.asarray(points, dtype=np.float64)
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * h  # [6, 3]: +x +y +z -x -y -z
    values = evaluate(shape, (p[None] + offsets[:, None]).reshape(-1, 3)).reshape(6, len(p))
    return (values[:3] - values[3:]).T / (2 * h)
