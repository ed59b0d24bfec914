"""Toy World nodes: the pack's own small text-to-image model (trained on procedurally drawn scenes) and its subjects.

Thin node classes over ``toyworld/`` (scene generator, model construction, scorers). The loader returns real
ComfyUI MODEL / CLIP / VAE objects (an SD1.5-family BaseModel, an SD1 CLIP, a TAESD-architecture VAE), so stock
KSampler / CLIPTextEncode / VAEDecode and every node of the pack run on it unchanged. Image size: the shipped model's
(``tw_model.shipped_image_size()``: 128 px for the world v2 set; 64 px without weights, the random model),
latents 8x smaller.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .nodes.errors import InputError, require
from .toyworld import model as tw_model
from .toyworld import scenes

CATEGORY = "personalize/ToyWorld"
SOURCES = ("trained", "random (untrained)")
SIZE = tw_model.shipped_image_size()   # what the shipped toy model was trained at (read from its file's recipe)


class ToyWorldLoader:
    DESCRIPTION = ("Loads the toy world's text-to-image model: a narrow SD1.5-architecture UNet, a bag-of-words CLIP "
                   "text encoder (SD1 tokenizer) and a TAESD-architecture VAE, trained by the pack on procedurally "
                   f"drawn {SIZE}x{SIZE} scenes ('a photo of a red striped ball on the beach'). Make "
                   f"{SIZE}x{SIZE} images (Empty Latent Image {SIZE}x{SIZE}).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (list(SOURCES), {"default": SOURCES[0],
                                       "tooltip": "'trained' loads weights/toyworld/*.safetensors shipped with the "
                                                  "pack; 'random (untrained)' builds the same objects with seeded "
                                                  "random UNet/VAE weights (mechanics only)."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (f"The toy SD1.5-family diffusion model (eps-prediction, {SIZE // 8}x{SIZE // 8} latents).",
                       "The toy text encoder (SD1 tokenizer, 768-wide embeddings).",
                       "The toy VAE (TAESD architecture, 8x downscale).")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, source="trained"):
        require(source in SOURCES, "source", f"one of {SOURCES}", source)
        if source == "trained":
            if not tw_model.weights_present():
                raise InputError("source", f"toy world weights in {tw_model.WEIGHTS_DIR}", "missing",
                                 hint="retrain with scripts/train_toyworld.py, or pick 'random (untrained)'")
            return tw_model.load()
        return tw_model.load_random(seed=0)


class ToyWorldSubject:
    DESCRIPTION = ("Renders a held-out toy-world subject (a class shape with a multi-part emblem the model never saw "
                   "in training) as reference photos with masks, and one of its toy-DreamBench prompts.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "subject": ([s.name for s in scenes.SUBJECTS], {"tooltip": "Which held-out subject to render."}),
            "references": ("INT", {"default": 4, "min": 1, "max": 5,
                                   "tooltip": "How many reference renders (different pose, scale, background)."}),
            "prompt_index": ("INT", {"default": 0, "min": 0, "max": 9,
                                     "tooltip": "Which of the subject's 10 benchmark prompts to output."}),
        }, "optional": {
            "size": ("INT", {"default": SIZE, "min": 16, "max": 1024, "step": 8,
                             "tooltip": "Side of the reference renders (px). Default: the size the shipped toy "
                                        "model was trained at."}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK", "STRING", "STRING")
    RETURN_NAMES = ("images", "masks", "prompt", "class_prompt")
    OUTPUT_TOOLTIPS = ("Reference renders, size x size.", "Subject masks of the references.",
                       "The benchmark prompt with the subject token ('a photo of a sks ball on the beach').",
                       "The same prompt naming only the class ('a photo of a ball on the beach').")
    FUNCTION = "render"
    CATEGORY = CATEGORY

    def render(self, subject, references=4, prompt_index=0, size=SIZE):
        by_name = {s.name: s for s in scenes.SUBJECTS}
        require(subject in by_name, "subject", f"one of {sorted(by_name)}", subject)
        require(1 <= int(references) <= 5, "references", "1 to 5", references)
        require(0 <= int(prompt_index) <= 9, "prompt_index", "0 to 9", prompt_index)
        require(int(size) % 8 == 0, "size", "a multiple of 8 (the VAE's 8x-down latent grid)", size)
        s = by_name[subject]
        refs = scenes.subject_references(s, int(references), size=int(size))
        imgs = torch.from_numpy(np.stack([r[0] for r in refs]))
        masks = torch.from_numpy(np.stack([r[1] for r in refs]))
        p = scenes.dreambench_prompts(s)[int(prompt_index)]
        return imgs, masks, p["prompt"], p["class_prompt"]


SEGMENTER_SOURCES = ("trained",)


class ToyWorldSegmenter:
    DESCRIPTION = ("Loads the toy world's mask source: a small U-Net (0.3 M parameters) trained on toy-world renders "
                   "(never on a held-out subject) and their VAE round trips to segment the subject of a toy-world "
                   "image. It stands in for SAM where a pipeline (BootPIG's bootstrap data) needs a subject mask for "
                   "each generated image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (list(SEGMENTER_SOURCES), {"default": SEGMENTER_SOURCES[0],
                                                 "tooltip": "'trained' loads the segmenter shipped with the pack "
                                                            "(weights/toyworld/segmenter.safetensors)."}),
        }}

    RETURN_TYPES = ("PERSONALIZE_MASK_SOURCE",)
    RETURN_NAMES = ("mask_source",)
    OUTPUT_TOOLTIPS = ("A mask source: called on IMAGE tensors [B, H, W, 3] it returns subject masks [B, H, W] in "
                       "{0, 1} (trained at 128x128; any size works).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, source="trained"):
        from .toyworld import segmenter

        require(source in SEGMENTER_SOURCES, "source", f"one of {SEGMENTER_SOURCES}", source)
        path = tw_model.SEGMENTER_PATH
        if not os.path.isfile(path):
            raise InputError("source", f"the toy segmenter's weights at {path}", "missing",
                             hint="train them with scripts/train_toyworld.py segmenter")
        return (segmenter.ToySegmenterMaskSource(segmenter.load(path), path),)


NODE_CLASS_MAPPINGS = {
    "PersonalizeToyWorldLoader": ToyWorldLoader,
    "PersonalizeToyWorldSubject": ToyWorldSubject,
    "PersonalizeToyWorldSegmenter": ToyWorldSegmenter,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeToyWorldLoader": "Toy World Loader (small trained text-to-image model)",
    "PersonalizeToyWorldSubject": "Toy World Subject (reference renders + benchmark prompt)",
    "PersonalizeToyWorldSegmenter": "Toy World Segmenter (mask source)",
}
