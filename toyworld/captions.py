"""The toy world's caption grammar for the BootPIG bootstrap: "a photo of a <object>, <scene>".

The object clause names what the toy text encoder knows (size, colour or pattern / split, class, symbol), drawn from
the training look distribution (``scenes.sample_look``: never a held-out subject's emblem, and the caption grammar
cannot name a held-out emblem anyway: symbol colours are never named); the scene is one of the six background
phrases. The toy world has no position words, so the grammar has no [position] part. Same interface as
``nodes.bootpig_data.CaptionGrammar``: ``caption(seed, index)`` is a pure function, ``describe()`` a dict.
"""
from __future__ import annotations

import numpy as np

from . import scenes


class ToyCaptions:
    name = "toy world"

    def describe(self) -> dict:
        return {"name": self.name, "classes": len(scenes.CLASSES), "scenes": len(scenes.BACKGROUNDS)}

    def caption(self, seed: int, index: int) -> str:
        rng = np.random.default_rng([0xB007, int(seed) % (2 ** 63), int(index)])
        scene = scenes.sample_scene(rng)
        text = scenes.random_caption(scene, rng)
        bg = scenes.BACKGROUNDS[scene.background]
        assert text.endswith(" " + bg)
        return text[: -len(bg) - 1] + ", " + bg
