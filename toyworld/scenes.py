"""The toy world's scenes: a deterministic procedural renderer and its caption grammar (numpy only).

A scene is one subject (a class shape with a *look*) at a position, scale, rotation and mirror, on one of six
backgrounds. Everything is drawn from a seed: no files.

World v2: base training sees the whole visual vocabulary the held-out subjects are made of. A look is a body colour
from the 11-colour palette with an optional pattern, or an emblem: a body split in two colours (vertical, horizontal,
diagonal, quadrants, rim, or none) and an optional central symbol (cross, ring, triangle, diamond, bar, dot) in a
third colour. Every training generator gets its looks from ``sample_look``, which rerolls the held-out subjects'
emblems (and their mirror images), on every class: the held-out *combinations* are never drawn, their parts are.

    >>> img, mask, cap, scene = base_example(0)      # img (64, 64, 3) float32 in [0, 1], mask (64, 64)
    >>> cap
    'a photo of a ... on the beach'

Held-out subjects (``SUBJECTS``) carry an emblem (two-colour split + a central symbol) that no training generator
draws; ``subject_references`` gives their reference renders and ``dreambench_prompts`` the toy DreamBench prompts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SIZE = 64          # default render size (px): the scorers' input; the shipped (world v2) model works at V2_SIZE
V2_SIZE = 128      # 16x16 latents: thin rims, rings and star points survive the 8x-down VAE
SUPERSAMPLE = 2    # drawn at SIZE*SUPERSAMPLE then box-filtered (anti-aliasing)

CLASSES = ("ball", "cube", "star", "mug", "teddy", "heart")
# the palette (the order matters: it seeds the held-out subjects); world v2 uses all 11 for bodies, splits, symbols
PALETTE = {
    "red": (210, 40, 40), "blue": (40, 80, 215), "green": (40, 165, 60),
    "yellow": (240, 205, 35), "purple": (145, 60, 185), "orange": (245, 135, 25),
    "pink": (245, 130, 190), "cyan": (40, 200, 215), "white": (245, 245, 245),
    "black": (25, 25, 25), "brown": (120, 70, 35),
}
COLORS = PALETTE
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "grass": "on the grass", "beach": "on the beach", "snow": "in the snow",
    "brick": "in front of a brick wall", "night": "under the night sky", "water": "on the water",
}
SIZE_WORDS = ("small", "big")
SCALE_RANGE = (0.42, 0.78)  # subject diameter / image size: large enough that the 8x8 latent holds its shape
SMALL_BELOW, BIG_ABOVE = 0.54, 0.66
EMBLEM_COLORS = PALETTE
SPLITS = ("vertical", "horizontal", "diagonal", "quadrants", "rim")
SYMBOLS = ("cross", "ring", "triangle", "diamond", "bar", "dot")
NONE = "none"      # an emblem's split / symbol may be absent
# caption words of the parts (single tokens or fixed pairs: the toy text encoder is a bag of words)
SPLIT_WORDS = {"vertical": "vertical split", "horizontal": "horizontal split", "diagonal": "diagonal split",
               "quadrants": "quartered", "rim": "rimmed"}
# splits whose mirror image (the sampler flips scenes) is the same split with the two colours swapped
MIRROR_SWAPS = ("vertical", "quadrants")
# look distribution of the training generators (sample_look)
P_SPLIT, P_SYMBOL, P_PATTERN = 0.6, 0.6, 0.5
SUBJECT_TOKEN = "sks"


@dataclass(frozen=True)
class Emblem:
    """A body split in colours a/b (split ``none``: one colour, b == a) with a symbol in colour c at its centre
    (symbol ``none``: c == a). Held-out subjects use a real split and symbol in three distinct colours."""

    split: str
    a: str
    b: str
    symbol: str
    c: str

    def describe(self) -> str:
        body = self.a if self.split == NONE else f"{self.a}/{self.b} {self.split} split"
        return body + ("" if self.symbol == NONE else f" with a {self.c} {self.symbol}")

    def mirrored(self) -> "Emblem":
        """The emblem as a mirrored render shows it (vertical / quadrant splits swap their colours)."""
        return dataclasses.replace(self, a=self.b, b=self.a) if self.split in MIRROR_SWAPS else self


@dataclass(frozen=True)
class Scene:
    cls: str
    background: str
    color: str = "red"
    pattern: str = "plain"
    cx: float = 0.5
    cy: float = 0.55
    scale: float = 0.6       # subject diameter as a fraction of the image
    angle: float = 0.0       # degrees
    flip: bool = False
    bg_seed: int = 0
    emblem: Emblem | None = None

    @property
    def size_word(self) -> str:
        return "small" if self.scale < SMALL_BELOW else "big" if self.scale > BIG_ABOVE else ""


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    emblem: Emblem


# ---------------------------------------------------------------- captions

def caption(scene: Scene, drop_color=False, drop_pattern=False, drop_size=False, token: str | None = None,
            drop_symbol=False) -> str:
    """'a photo of a [size] [colour] [pattern | split] <class> [with a <symbol>] <background phrase>'.

    The colour is named only when the body has one colour, and the symbol's colour never: the toy text encoder is a
    bag of words, so 'red blue ring' could not say which part is which. Split and symbol kinds have their own words.
    Held-out subjects' scenes: 'a photo of a [size] [token] <class> <background phrase>'."""
    words = ["a", "photo", "of", "a"]
    if scene.size_word and not drop_size:
        words.append(scene.size_word)
    e = scene.emblem
    if token:
        words.append(token)
    elif e is None:
        if not drop_color:
            words.append(scene.color)
        if scene.pattern != "plain" and not drop_pattern:
            words.append(scene.pattern)
    else:
        if e.split == NONE and not drop_color:
            words.append(e.a)
        if e.split != NONE and not drop_pattern:
            words.append(SPLIT_WORDS[e.split])
    words.append(scene.cls)
    if not token and e is not None and e.symbol != NONE and not drop_symbol:
        words += ["with", "a", e.symbol]
    return " ".join(words) + " " + BACKGROUNDS[scene.background]


def random_caption(scene: Scene, rng: np.random.Generator, p_drop: float = 0.25) -> str:
    """A caption with attribute words dropped at random (so class-only prompts are in distribution)."""
    return caption(scene, drop_color=rng.random() < p_drop, drop_pattern=rng.random() < p_drop,
                   drop_size=rng.random() < p_drop, drop_symbol=rng.random() < p_drop)


# ---------------------------------------------------------------- looks: what training may draw

def _emblem_ok(e: Emblem) -> bool:
    return len({e.a, e.b, e.c}) == 3


def _make_subjects() -> tuple[Subject, ...]:
    rng = np.random.default_rng(0x5B1EC7)
    out, seen = [], set()
    names = list(PALETTE)
    i = 0
    while len(out) < 12:
        cls = CLASSES[i % len(CLASSES)]
        e = Emblem(SPLITS[rng.integers(len(SPLITS))], names[rng.integers(len(names))], names[rng.integers(len(names))],
                   SYMBOLS[rng.integers(len(SYMBOLS))], names[rng.integers(len(names))])
        if not _emblem_ok(e) or (e.split, e.symbol) in seen:
            continue
        seen.add((e.split, e.symbol))
        out.append(Subject(f"{cls}_{len(out):02d}", cls, e))
        i += 1
    return tuple(out)


SUBJECTS: tuple[Subject, ...] = _make_subjects()   # 12 held-out subjects, 2 per class

# Every emblem a training image could show a held-out subject's look with: its own and its mirror image (the
# sampler flips scenes; all symbols are mirror-symmetric). Excluded on every class, not only the subject's own.
HELD_OUT_EMBLEMS = frozenset(f for s in SUBJECTS for f in (s.emblem, s.emblem.mirrored()))


def admissible(emblem: Emblem | None) -> bool:
    """May a training generator draw this look? Everything but the held-out subjects' emblems."""
    return emblem is None or emblem not in HELD_OUT_EMBLEMS


def _draw_look(rng: np.random.Generator):
    """One raw draw from the look distribution: (colour, pattern, emblem or None); may hit a held-out emblem."""
    names = list(PALETTE)
    split = SPLITS[rng.integers(len(SPLITS))] if rng.random() < P_SPLIT else NONE
    symbol = SYMBOLS[rng.integers(len(SYMBOLS))] if rng.random() < P_SYMBOL else NONE
    a = names[rng.integers(len(names))]
    b = a if split == NONE else [n for n in names if n != a][rng.integers(len(names) - 1)]
    c = a if symbol == NONE else [n for n in names if n not in (a, b)][rng.integers(len(names) - len({a, b}))]
    if split == NONE and symbol == NONE:      # a one-colour body, plain or patterned (white secondary colour)
        pattern = "plain" if a == "white" or rng.random() >= P_PATTERN else PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        return a, pattern, None
    return a, "plain", Emblem(split, a, b, symbol, c)


def sample_look(rng: np.random.Generator):
    """The one sampler of training looks (base, VAE and scorer data): (colour, pattern, emblem or None), never a
    held-out subject's emblem (rerolled; the test enumerates ``_draw_look``'s whole support through ``admissible``)."""
    while True:
        look = _draw_look(rng)
        if admissible(look[2]):
            return look


def look_space():
    """Every look ``_draw_look`` can return (its support): for the tests."""
    names = list(PALETTE)
    for a in names:
        yield a, "plain", None
        if a != "white":
            for pat in PATTERNS[1:]:
                yield a, pat, None
        for split in (NONE,) + SPLITS:
            for b in ([a] if split == NONE else [n for n in names if n != a]):
                for symbol in (NONE,) + SYMBOLS:
                    if split == NONE and symbol == NONE:
                        continue
                    for c in ([a] if symbol == NONE else [n for n in names if n not in (a, b)]):
                        yield a, "plain", Emblem(split, a, b, symbol, c)


# ---------------------------------------------------------------- sampling

def sample_scene(rng: np.random.Generator, cls: str | None = None, background: str | None = None,
                 look=None) -> Scene:
    """A random scene. Its look comes from ``sample_look`` unless ``look`` = (colour, pattern, emblem) is given
    (held-out subjects' scenes, restaging an instance)."""
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if look is None:
        color, pattern, emblem = sample_look(rng)
    else:   # two draws world v1 spent on colour and pattern: held-out subjects' renders stay those of world v1
        color, pattern, emblem = look
        rng.integers(6), rng.integers(4)
    return Scene(
        cls=cls, background=background, color=color, pattern=pattern,
        cx=float(rng.uniform(0.32, 0.68)), cy=float(rng.uniform(0.42, 0.6)),
        scale=float(rng.uniform(*SCALE_RANGE)), angle=float(rng.uniform(-20, 20)), flip=bool(rng.random() < 0.5),
        bg_seed=int(rng.integers(2**31)), emblem=emblem)


def base_scene(seed: int):
    """The scene of base-training example ``seed``, and the generator that then draws its caption."""
    rng = np.random.default_rng([0xBA5E, seed])
    return sample_scene(rng), rng


def base_example(seed: int, size: int = SIZE):
    """One base-training example: (image HxWx3 float32 [0,1], mask HxW float32, caption, scene). Deterministic."""
    scene, rng = base_scene(seed)
    img, mask = render(scene, size)
    return img, mask, random_caption(scene, rng), scene


def training_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """n random training scenes (VAE, scorers): the same look distribution as base training."""
    return [sample_scene(rng) for _ in range(n)]


def restage(scene: Scene, rng: np.random.Generator, background: str | None = None) -> Scene:
    """The same instance (class, colour, pattern, emblem) at a new position/scale/rotation on a new background."""
    return sample_scene(rng, cls=scene.cls, background=background, look=(scene.color, scene.pattern, scene.emblem))


def subject_scene(subject: Subject, rng: np.random.Generator, background: str | None = None) -> Scene:
    return sample_scene(rng, cls=subject.cls, background=background,
                        look=(subject.emblem.a, "plain", subject.emblem))


def subject_references(subject: Subject, n: int = 4, size: int = SIZE):
    """n reference renders of a held-out subject at different poses/scales/backgrounds: list of (img, mask, scene)."""
    idx = SUBJECTS.index(subject) if subject in SUBJECTS else 99
    rng = np.random.default_rng([0x4EF, idx])
    bgs = list(BACKGROUNDS)
    start = int(rng.integers(len(bgs)))
    out = []
    for k in range(n):
        sc = subject_scene(subject, rng, background=bgs[(start + 2 * k) % len(bgs)])
        sc = dataclasses.replace(sc, scale=float(rng.uniform(0.6, 0.74)))   # references show the subject large
        out.append((*render(sc, size), sc))
    return out


DREAMBENCH_SIZES = ("", "", "", "", "", "", "small", "big", "small", "big")


def dreambench_prompts(subject: Subject) -> list[dict]:
    """10 prompts per subject: each background once, plus size variations. Each: prompt (with the subject token),
    class_prompt (no token: the floor), cls, background."""
    bgs = list(BACKGROUNDS)
    out = []
    for k in range(10):
        bg = bgs[k % len(bgs)] if k < 6 else bgs[(k * 5 + SUBJECTS.index(subject)) % len(bgs)]
        size = DREAMBENCH_SIZES[k]
        pre = f"a photo of a {size + ' ' if size else ''}"
        out.append({"prompt": f"{pre}{SUBJECT_TOKEN} {subject.cls} {BACKGROUNDS[bg]}",
                    "class_prompt": f"{pre}{subject.cls} {BACKGROUNDS[bg]}",
                    "cls": subject.cls, "background": bg})
    return out


def prompt_renders(subject: Subject, seeds: int, size: int = SIZE, prompts: int = 10) -> np.ndarray:
    """The subject drawn as each of its 10 benchmark prompts (the first ``prompts`` of them) asks, ``seeds`` times
    each (the benchmark's ceiling row and the VAE round-trip set): (prompts * seeds, size, size, 3)."""
    out = []
    for k, p in enumerate(dreambench_prompts(subject)[:prompts]):
        for s in range(seeds):
            rng = np.random.default_rng([0xCE1, SUBJECTS.index(subject), k, s])
            sc = subject_scene(subject, rng, background=p["background"])
            word = "small" if "small" in p["prompt"] else "big" if " big " in p["prompt"] else ""
            if word:   # the middle of the size word's range
                lo, hi = SCALE_RANGE
                sc = dataclasses.replace(sc, scale=(lo + SMALL_BELOW) / 2 if word == "small" else (BIG_ABOVE + hi) / 2)
            out.append(render(sc, size)[0])
    return np.stack(out)


# ---------------------------------------------------------------- drawing

def _rgb(name: str) -> np.ndarray:
    return np.asarray(EMBLEM_COLORS[name], np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated value noise in [-1, 1], shape (s, s)."""
    g = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, s, endpoint=False, dtype=np.float32)
    i = t.astype(np.int64)
    f = t - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _grid(s: int):
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    return np.meshgrid(c, c, indexing="xy")   # x (columns), y (rows, downward)


def _sky(y, top, bottom):
    t = np.clip(y, 0, 1)[..., None]
    return np.asarray(top, np.float32) / 255 * (1 - t) + np.asarray(bottom, np.float32) / 255 * t


def draw_background(name: str, seed: int, s: int) -> np.ndarray:
    rng = np.random.default_rng([0xB6, seed])
    x, y = _grid(s)
    n1 = _smooth_noise(rng, s, 6)
    n2 = _smooth_noise(rng, s, 16)
    h = float(rng.uniform(0.25, 0.42))
    if name in ("grass", "beach", "snow"):
        top, bot = {"grass": ((110, 170, 230), (195, 225, 245)), "beach": ((90, 160, 235), (190, 220, 245)),
                    "snow": ((170, 180, 200), (215, 220, 230))}[name]
        img = _sky(y / h, top, bot)
        ground = y >= h + 0.03 * n1
        if name == "grass":
            g = np.asarray((55, 140, 45), np.float32) / 255
            blades = 0.5 + 0.5 * np.sin(x * s * 0.9 + 3 * n2)
            shade = 0.75 + 0.3 * blades[..., None] * (0.6 + 0.4 * (y[..., None] - h))
            col = g * shade + 0.05 * n2[..., None]
        elif name == "beach":
            sea = (y >= h) & (y < h + 0.12)
            col = np.asarray((225, 200, 140), np.float32) / 255 * (0.92 + 0.08 * n2[..., None])
            speck = rng.random((s, s)) < 0.04
            col[speck] *= 0.85
            img[sea] = np.asarray((30, 105, 175), np.float32) / 255 * (0.9 + 0.15 * np.sin(x[sea] * 60 + y[sea] * 9))[..., None]
            ground = y >= h + 0.12
        else:
            col = np.asarray((242, 246, 252), np.float32) / 255 - 0.08 * (0.5 + 0.5 * n1[..., None]) * np.asarray(
                [1.0, 0.7, 0.2], np.float32)
            flakes = rng.random((s, s)) < 0.015
            img[flakes & ~ground] = 1.0
        img = np.where(ground[..., None], col, img)
    elif name == "brick":
        mortar = np.asarray((185, 180, 170), np.float32) / 255
        bh = float(rng.uniform(0.085, 0.11))
        row = np.floor(y / bh)
        bw = 2.1 * bh
        xo = x + (row % 2) * bw / 2 + float(rng.uniform(0, 1))
        col_idx = np.floor(xo / bw)
        in_mortar = ((y / bh - row) < 0.14) | ((xo / bw - col_idx) < 0.07)
        tint = np.sin(row * 12.9898 + col_idx * 78.233) * 43758.5453
        tint = (tint - np.floor(tint))[..., None]
        brick = np.asarray((170, 65, 45), np.float32) / 255 * (0.8 + 0.35 * tint) + 0.03 * n2[..., None]
        img = np.where(in_mortar[..., None], mortar, brick)
    elif name == "night":
        img = _sky(y, (8, 10, 35), (30, 35, 85))
        stars = rng.random((s, s)) < 0.02
        img[stars] = rng.uniform(0.6, 1.0, (int(stars.sum()), 1)).astype(np.float32)
        mx, my, mr = float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.08, 0.25)), 0.07
        moon = (x - mx) ** 2 + (y - my) ** 2 < mr ** 2
        img[moon] = np.asarray((245, 240, 200), np.float32) / 255
    elif name == "water":
        base = np.asarray((35, 105, 180), np.float32) / 255
        waves = np.sin(y * s * 0.55 + 2.5 * np.sin(x * 9 + float(rng.uniform(0, 6))) + 2 * n1)
        img = base * (0.85 + 0.1 * n2[..., None]) + (waves > 0.75)[..., None] * 0.25
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 1).astype(np.float32)


def _shape(cls: str, u: np.ndarray, v: np.ndarray):
    """Mask (bool) and shading (float) of a class shape in local coordinates (u right, v down, radius 1)."""
    shade = np.ones_like(u)
    if cls == "ball":
        m = u ** 2 + v ** 2 < 1
        shade = 1.1 - 0.35 * np.clip(((u - -0.4) ** 2 + (v - -0.4) ** 2) / 2.5, 0, 1)
    elif cls == "cube":
        front = (u > -0.85) & (u < 0.45) & (v > -0.45) & (v < 0.85)
        top = (v >= -0.85) & (v <= -0.45) & (u > -0.85 + (-0.45 - v)) & (u < 0.45 + (-0.45 - v))
        side = (u >= 0.45) & (u <= 0.85) & (v < 0.85 - (u - 0.45)) & (v > -0.45 - (u - 0.45))
        m = front | top | side
        shade = np.where(top, 1.25, np.where(side, 0.7, 1.0))
    elif cls == "star":
        r = np.sqrt(u ** 2 + v ** 2)
        th = np.arctan2(u, -v)                     # 0 = up
        k = (th / (2 * np.pi / 5)) % 1.0
        tri = np.abs(k - 0.5) * 2                  # 1 at a point, 0 between points
        m = r < 0.42 + 0.58 * tri ** 1.5
        shade = 1.05 - 0.2 * r
    elif cls == "mug":
        body = (np.abs(u + 0.15) < 0.6) & (v > -0.7) & (v < 0.8)
        hr = np.sqrt((u - 0.45) ** 2 + (v - 0.05) ** 2)
        handle = (hr > 0.22) & (hr < 0.42) & (u > 0.45)
        m = body | handle
        rim = body & (v < -0.58)
        shade = np.where(rim, 0.65, 1.0 - 0.25 * np.abs(u + 0.15))
    elif cls == "teddy":
        head = u ** 2 + (v + 0.38) ** 2 < 0.42 ** 2
        ears = ((np.abs(u) - 0.36) ** 2 + (v + 0.75) ** 2) < 0.18 ** 2
        body = (u / 0.58) ** 2 + ((v - 0.42) / 0.52) ** 2 < 1
        m = head | ears | body
        eyes = ((np.abs(u) - 0.15) ** 2 + (v + 0.45) ** 2) < 0.065 ** 2
        nose = (u ** 2 + (v + 0.28) ** 2) < 0.07 ** 2
        shade = np.where(eyes | nose, 0.12, np.where(ears, 0.8, 1.0))
    elif cls == "heart":
        x, y = u * 1.25, -(v * 1.25) + 0.25
        m = (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 < 0
        shade = 1.1 - 0.25 * np.clip(np.sqrt(u ** 2 + v ** 2), 0, 1)
    else:
        raise ValueError(f"unknown class {cls!r}")
    return m, shade.astype(np.float32)


def _pattern(pattern: str, u, v):
    """Where the secondary (white) colour goes."""
    if pattern == "plain":
        return np.zeros_like(u, bool)
    if pattern == "striped":
        return ((v + 2) * 2.4) % 1.0 < 0.45
    if pattern == "dotted":
        gu, gv = (u + 2) * 2.2 % 1.0 - 0.5, (v + 2) * 2.2 % 1.0 - 0.5
        return gu ** 2 + gv ** 2 < 0.2 ** 2
    if pattern == "checkered":
        return (np.floor((u + 2) * 2.4) + np.floor((v + 2) * 2.4)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


def _emblem(e: Emblem, u, v):
    """Colour map (H, W, 3) of an emblem in local coordinates."""
    a, b, c = _rgb(e.a), _rgb(e.b), _rgb(e.c)
    side = {"vertical": u < 0, "horizontal": v < 0, "diagonal": u + v < 0, "quadrants": (u < 0) ^ (v < 0),
            "rim": u ** 2 + v ** 2 > 0.62 ** 2, NONE: np.ones_like(u, bool)}[e.split]
    col = np.where(side[..., None], a, b)
    r = np.sqrt(u ** 2 + v ** 2)
    sym = {"cross": ((np.abs(u) < 0.1) | (np.abs(v) < 0.1)) & (np.abs(u) < 0.42) & (np.abs(v) < 0.42),
           "ring": (r > 0.2) & (r < 0.36),
           "triangle": (v < 0.28) & (v > -0.4 + 1.9 * np.abs(u) * 0.9),
           "diamond": np.abs(u) + np.abs(v) < 0.38,
           "bar": (np.abs(v) < 0.12) & (np.abs(u) < 0.55),
           "dot": r < 0.26, NONE: np.zeros_like(u, bool)}[e.symbol]
    return np.where(sym[..., None], c, col)


def render(scene: Scene, size: int = SIZE):
    """Draw a scene: (image (size, size, 3) float32 in [0, 1], subject mask (size, size) float32)."""
    s = size * SUPERSAMPLE
    img = draw_background(scene.background, scene.bg_seed, s)
    x, y = _grid(s)
    rad = scene.scale / 2
    dx, dy = (x - scene.cx) / rad, (y - scene.cy) / rad
    t = np.deg2rad(scene.angle)
    u = np.cos(t) * dx + np.sin(t) * dy
    v = -np.sin(t) * dx + np.cos(t) * dy
    if scene.flip:
        u = -u
    m, shade = _shape(scene.cls, u, v)
    if scene.emblem is not None:
        col = _emblem(scene.emblem, u, v)
    else:
        base = _rgb(scene.color)
        sec = np.asarray((0.96, 0.96, 0.96), np.float32)
        col = np.where(_pattern(scene.pattern, u, v)[..., None], sec, base)
    col = np.clip(col * shade[..., None], 0, 1)
    # a soft shadow under the subject
    sh = ((x - scene.cx) / (rad * 0.9)) ** 2 + ((y - (scene.cy + rad * 0.95)) / (rad * 0.22)) ** 2 < 1
    img = np.where((sh & ~m)[..., None], img * 0.6, img)
    img = np.where(m[..., None], col, img)
    f = SUPERSAMPLE
    img = img.reshape(size, f, size, f, 3).mean(axis=(1, 3))
    mask = m.astype(np.float32).reshape(size, f, size, f).mean(axis=(1, 3))
    return img.astype(np.float32), mask


def batch(seeds, size: int = SIZE):
    """Base examples for many seeds: (images (N, size, size, 3), masks (N, size, size), captions, scenes)."""
    items = [base_example(int(sd), size) for sd in seeds]
    return (np.stack([i[0] for i in items]), np.stack([i[1] for i in items]), [i[2] for i in items],
            [i[3] for i in items])
