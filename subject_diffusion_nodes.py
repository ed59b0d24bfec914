"""Subject-Diffusion nodes (arXiv 2307.11410, OPPO): open-domain personalization from one reference image with
location control. The official weights were never released (Subject-Diffusion issues #2/#4), so the pack builds a
Subject-Diffusion-shaped model from any SD checkpoint (new parts zero-initialised: identical output until trained),
trains it, and runs it when weights exist.

Thin node classes over ``nodes/``: the location channel and conv_in expansion in ``nodes/location.py``, adapters,
MLPs and the weights format in ``nodes/adapters.py``, the text fusion in ``nodes/text_fusion.py``, the trainer in
``nodes/subject_training.py``, SAM in ``nodes/sam.py``.
"""
from __future__ import annotations

import os

import torch

from .nodes import adapters as ad
from .nodes import introspect, location, paths
from .nodes import sam as sam_lib
from .nodes.errors import InputError, require

CATEGORY = "personalize/Subject-Diffusion"
WEIGHTS = "SUBJECT_DIFFUSION_WEIGHTS"
SAM_MODEL = sam_lib.SAM_MODEL
VISION_SIZE = 224


def _latent_size(latent, input_name="latent"):
    require(isinstance(latent, dict) and "samples" in latent, input_name, "a LATENT", type(latent).__name__)
    s = latent["samples"]
    return int(s.shape[-2]), int(s.shape[-1])


def _references(images, mask, input_name="image"):
    """IMAGE (+ optional MASK) -> subject-on-white squares for CLIP vision, and subject boxes (x, y, w, h) or None."""
    from .nodes.images import as_batch, check_masks, subject_on_white

    images = as_batch(images, input_name)
    require(images.shape[0] <= location.MAX_SUBJECTS, input_name,
            f"1 or {location.MAX_SUBJECTS} reference images (one per subject)", images.shape[0])
    masks = check_masks(mask, images, "mask")
    refs = torch.stack([subject_on_white(images[i], None if masks is None else masks[i], VISION_SIZE)
                        for i in range(images.shape[0])])
    boxes = None if masks is None else [location.mask_to_box(masks[i]) for i in range(masks.shape[0])]
    return refs, boxes, (int(images.shape[1]), int(images.shape[2]))


def _check_weights(weights, input_name="weights"):
    require(isinstance(weights, ad.SubjectWeights), input_name, "SUBJECT_DIFFUSION_WEIGHTS from the Subject-Diffusion "
            "Weights Loader, Zero-Init Weights or Trainer", type(weights).__name__)


def _check_vision(weights, clip_vision):
    width, tokens, embed = ad.vision_dims(clip_vision)
    cfg = weights.config
    if (width, tokens, embed) != (cfg["vision_width"], cfg["vision_tokens"], cfg["embed_dim"]):
        raise InputError("clip_vision", f"the CLIP vision model the weights were made for ({cfg['vision_tokens']} "
                         f"patch tokens of width {cfg['vision_width']}, embeddings of {cfg['embed_dim']}; "
                         "Subject-Diffusion uses ViT-H/14)", f"{tokens} tokens of width {width}, embeddings of {embed}")


class ExpandInputChannels:
    DESCRIPTION = ("Turns a 4-channel UNet into a 5-channel one for Subject-Diffusion's location channel: conv_in "
                   "gets one more input channel whose weights are zero (the paper's initialisation), so the model "
                   "gives exactly the base model's output until trained. Works on its own: without Location Mask "
                   "Concat the new channel reads 0 (no subject constraint) and a KSampler gives the unexpanded "
                   "model's output. The input model is unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "An SD1.5 / SD2 / SDXL model with a 4-channel UNet."})}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The 5-channel model: connect it through Location Mask Concat to place the subject (straight "
                       "into a KSampler it samples with no location: the base model's output while untrained).",)
    FUNCTION = "expand"
    CATEGORY = CATEGORY

    def expand(self, model):
        introspect.family(model, "model")
        have, latent = location.input_channels(model), location.output_channels(model)
        require(have == latent, "model", f"a UNet with {latent} input channels (not yet expanded)",
                f"{have} input channels")
        return (_no_location(location.expand_model(model, 1)),)


def _no_location(model):
    """A 5-channel model that works on its own: until Location Mask Concat replaces it, every UNet call gets an
    all-zero location channel, the paper's "no location" input (its CFG dropout zeroes the channel), so no subject
    constraint; with the zero-init conv_in the output equals the unexpanded model's."""
    if location.find_location(model) is not None:
        return model
    return location.apply_location(model, torch.zeros(1, 1, 1, 1), "same")


class LocationMaskConcat:
    DESCRIPTION = ("Says where the subject(s) go: builds Subject-Diffusion's location channel (0 inside each "
                   "subject's box or mask, 1 elsewhere, two subjects multiplied) at the latent's resolution and "
                   "concatenates it to the noisy latent on every UNet call, both CFG branches included. The model's "
                   "first convolution must take 5 channels (Expand Input Channels or a Subject-Diffusion UNet).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A 5-channel model (from Expand Input Channels, the Subject-Diffusion "
                                               "Weights Loader, or a Subject-Diffusion checkpoint)."}),
                "latent": ("LATENT", {"tooltip": "The latent you sample: the channel is built at its resolution "
                                                 "(boxes are in pixels of latent size x 8)."}),
                "boxes": ("STRING", {"default": "128, 96, 256, 320", "multiline": True,
                                     "tooltip": "One box per subject and line, 'x, y, w, h' in pixels of the image "
                                                "(up to 2 subjects, boxes + masks). Must lie inside the image. "
                                                "Leave empty to use only the mask."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask(s) (1 = subject), one per subject, any "
                                             "resolution: resized to the latent grid (nearest)."}),
                "uncond_mask": (list(location.UNCOND_MODES), {
                    "default": "zero",
                    "tooltip": "Channel of the unconditional (negative) rows: zero = all zeros, as Subject-Diffusion's "
                               "unconditional branch (no mask, no objects; CFG then also steers toward the "
                               "location); same = the same map on every row."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the location channel on every call; connect it to a KSampler.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, latent, boxes="", mask=None, uncond_mask="zero"):
        introspect.family(model, "model")
        require(isinstance(latent, dict) and "samples" in latent, "latent", "a LATENT", type(latent).__name__)
        channel, _, _ = location.build_channel(latent["samples"], boxes, mask)
        return (location.apply_location(model, channel, uncond_mask),)


def _weights_choices():
    return paths.list_files("subject_diffusion")


class SubjectDiffusionLoader:
    DESCRIPTION = ("Loads trained Subject-Diffusion weights from models/subject_diffusion/ (as the Subject-Diffusion "
                   "Trainer saves them): applies the trained conv_in (5 channels) and cross-attention key/value "
                   "weights to the model and outputs the adapters and MLPs for Subject Adapter / Subject Image "
                   "Prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The checkpoint the weights were trained from."}),
            "weights_name": (_weights_choices(), {"tooltip": "A .safetensors file in models/subject_diffusion/."}),
        }}

    RETURN_TYPES = ("MODEL", WEIGHTS)
    RETURN_NAMES = ("model", "weights")
    OUTPUT_TOOLTIPS = ("The model with trained conv_in (5 channels) and attn2 k/v: connect to Subject Adapter and "
                       "Location Mask Concat.", "Adapters and MLPs for Subject Adapter and Subject Image Prompt.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, weights_name):
        path = weights_name if os.path.isabs(weights_name) and os.path.exists(weights_name) else \
            paths.full_path("subject_diffusion", weights_name)
        weights = ad.load_weights(path, "weights_name")
        if weights.config.get("family") != introspect.family(model, "model"):
            raise InputError("model", f"an {weights.config.get('family')} model (the weights' family)",
                             introspect.family(model))
        ad.check_model(weights, model, "weights_name")
        m = ad.apply_unet(model, weights)
        if location.input_channels(m) == location.output_channels(m) + 1:
            m = _no_location(m)  # samples on its own (no location) until Location Mask Concat sets one
        return (m, weights)


class SubjectDiffusionInitWeights:
    DESCRIPTION = ("Builds Subject-Diffusion's new parts for a model without training them: adapter gates at 0 (the "
                   "adapters change nothing until trained), MLPs with default initialisation. The starting point of "
                   "the Trainer; Subject Image Prompt refuses these (its MLP needs training).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the parts are made for (block widths are read from it)."}),
                "vision_width": ("INT", {"default": 1280, "min": 8, "max": 8192,
                                         "tooltip": "Width of CLIP-vision patch tokens (ViT-H/14: 1280, the paper's "
                                                    "encoder). Ignored when clip_vision is connected."}),
                "vision_tokens": ("INT", {"default": 256, "min": 1, "max": 4096,
                                          "tooltip": "Patch tokens per image (ViT-H/14 at 224 px: 256). Ignored when "
                                                     "clip_vision is connected."}),
                "embed_dim": ("INT", {"default": 1024, "min": 8, "max": 8192,
                                      "tooltip": "Width of the projected CLIP-vision embedding (ViT-H/14: 1024). "
                                                 "Ignored when clip_vision is connected."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the MLP / adapter initialisation."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional: read the three widths from this model."}),
            },
        }

    RETURN_TYPES = (WEIGHTS,)
    RETURN_NAMES = ("weights",)
    OUTPUT_TOOLTIPS = ("Untrained Subject-Diffusion parts (identity adapters).",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, model, vision_width=1280, vision_tokens=256, embed_dim=1024, seed=0, clip_vision=None):
        introspect.family(model, "model")
        if clip_vision is not None:
            vision_width, vision_tokens, embed_dim = ad.vision_dims(clip_vision)
        with torch.inference_mode(False):
            return (ad.init_weights(model, vision_width, vision_tokens, embed_dim, ad.HIDDEN, int(seed)),)


class SubjectImagePrompt:
    DESCRIPTION = ("Subject-Diffusion's fused text encoder: the prompt becomes '<text>, the <label> is sks' per "
                   "subject and the token 'sks' is replaced, before the text encoder, by the reference image's "
                   "CLIP-vision embedding passed through the trained MLP. Needs trained weights.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (SD1.5 or SD2.x)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the weights were trained with "
                                                           "(the paper: OpenCLIP ViT-H/14)."}),
                "weights": (WEIGHTS, {"tooltip": "TRAINED weights (Subject-Diffusion Weights Loader or Trainer)."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s), one per subject (1 or 2): the subject on white, or "
                                               "with its mask below."}),
                "text": ("STRING", {"default": "a photo on the beach", "multiline": True,
                                    "tooltip": "The prompt. ', the <label> is sks' is appended per subject unless the "
                                               "text already contains 'sks' once per subject."}),
                "labels": ("STRING", {"default": "dog", "tooltip": "Class word of each subject, comma separated "
                                                                    "(e.g. 'dog' or 'dog, cat')."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject masks (one per image): the background is made white "
                                             "and the image cropped to the subject, as in training."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt with the subject fused in: connect to the KSampler's positive input.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, clip_vision, weights, image, text, labels, mask=None):
        from .nodes import text_fusion as tf

        _check_weights(weights)
        if not weights.trained:
            raise InputError("weights", "TRAINED Subject-Diffusion weights (the image-prompt MLP must be trained)",
                             "untrained (zero-init) weights", "Train them with the Subject-Diffusion Trainer or "
                             "load a trained file with the Subject-Diffusion Weights Loader")
        key = tf.text_key(clip)
        refs, _, _ = _references(image, mask)
        labs = [s.strip() for s in labels.split(",") if s.strip()]
        require(len(labs) == refs.shape[0], "labels", f"{refs.shape[0]} label(s), one per reference image",
                f"{len(labs)}")
        _check_vision(weights, clip_vision)
        ph = tf.placeholder_id(clip, key)
        width = tf.token_width(clip)
        require(width == int(weights.config["text_width"]), "clip", f"a text encoder with {weights.config['text_width']}"
                "-wide token embeddings (the one the weights were trained with)", f"width {width}")
        prompt = text if text.count(tf.PLACEHOLDER) == len(labs) else tf.make_prompt(text, labs)
        cls = clip_vision.encode_image(refs)["image_embeds"].float()
        mlp = weights.modules.text_mlp
        p = next(mlp.parameters())
        with torch.no_grad():
            emb = mlp(cls.to(p.device, p.dtype)).float().cpu()
        fused, _ = tf.fuse_tokens(clip.tokenize(prompt), key, ph, [emb[i] for i in range(emb.shape[0])])
        out = clip.encode_from_tokens(fused, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return ([[cond, out]],)


class SubjectAdapter:
    DESCRIPTION = ("Subject-Diffusion's fine-grained reference control: gated self-attention adapters in every "
                   "transformer block (GLIGEN-style, ComfyUI's own module) read the reference's CLIP-vision patch "
                   "tokens fused with Fourier-embedded boxes. Negative (unconditional) rows get the null objects. "
                   "With zero-init weights the gates are 0 and the output is exactly the input model's.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model (5-channel from Expand Input Channels / the Loader)."}),
                "weights": (WEIGHTS, {"tooltip": "From the Subject-Diffusion Weights Loader, Trainer, or Zero-Init "
                                                 "Weights (identity)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the weights were made for "
                                                           "(the paper: ViT-H/14)."}),
                "image": ("IMAGE", {"tooltip": "Reference image(s), one per subject (1 or 2)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                       "tooltip": "The adapters' scale beta (paper/GLIGEN: 1)."}),
                "use_bbox": ("BOOLEAN", {"default": False,
                                         "tooltip": "Feed the box position to the adapters. Off = the official "
                                                    "test default: position only when there are 2 subjects."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject masks (one per image): white background, cropped."}),
                "boxes": ("STRING", {"default": "", "multiline": True,
                                     "tooltip": "Where each subject goes, 'x, y, w, h' pixels per line (as in "
                                                "Location Mask Concat), normalised by the latent's size. Empty = "
                                                "the whole image."}),
                "latent": ("LATENT", {"tooltip": "The latent being sampled (gives the image size for the boxes)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Sampling progress at which the adapters start."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Sampling progress at which they stop (the paper's text-image "
                                                     "interpolation: image-conditioned while t > alpha T)."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the subject adapters.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, weights, clip_vision, image, strength=1.0, use_bbox=False, mask=None, boxes="",
              latent=None, start_percent=0.0, end_percent=1.0):
        _check_weights(weights)
        introspect.family(model, "model")
        ad.check_model(weights, model)
        require(start_percent <= end_percent, "start_percent", f"at most end_percent ({end_percent})", start_percent)
        refs, _, _ = _references(image, mask)
        k = refs.shape[0]
        box_list = location.parse_boxes(boxes, "boxes")
        if box_list:
            require(latent is not None, "latent", "the LATENT being sampled when boxes are given", None)
            h, w = _latent_size(latent)
            H, W = h * location.LATENT_FACTOR, w * location.LATENT_FACTOR
            for b in box_list:
                location.check_box(b, W, H, "boxes")
            require(len(box_list) == k, "boxes", f"{k} box(es), one per reference image", f"{len(box_list)}")
            xyxy = torch.tensor([location.box_to_xyxy(b, W, H) for b in box_list], dtype=torch.float32)
        else:
            xyxy = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * k)
        _check_vision(weights, clip_vision)
        tokens = clip_vision.encode_image(refs)["last_hidden_state"][:, 1:].float().cpu()
        ms = model.get_model_object("model_sampling")
        return (ad.apply_adapters(model, weights, tokens, xyxy, bool(use_bbox), float(strength),
                                  float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))),)


class SAMLoader:
    DESCRIPTION = ("Loads a Segment Anything checkpoint (ViT-B/L/H, e.g. sam_vit_h_4b8939.pth) from models/sams/ "
                   "with torch.load(weights_only=True); the architecture is read from the file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sam_name": (paths.list_files("sams"), {"tooltip": "A checkpoint in models/sams/."})}}

    RETURN_TYPES = (SAM_MODEL,)
    OUTPUT_TOOLTIPS = ("The SAM model, for Subject Mask (SAM).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, sam_name):
        path = sam_name if os.path.isabs(sam_name) and os.path.exists(sam_name) else paths.full_path("sams", sam_name)
        with torch.inference_mode(False):
            return (sam_lib.load(path),)


class SubjectMaskSAM:
    DESCRIPTION = ("Segments the subject with Segment Anything: from a box, from points, or (neither) the most "
                   "central mask found automatically, holes filled. Outputs the MASK and the subject pasted on white "
                   "- the reference BootPIG and Subject-Diffusion both want.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sam_model": (SAM_MODEL, {"tooltip": "From SAM Loader."}),
                "image": ("IMAGE", {"tooltip": "The photo(s) of the subject."}),
                "box": ("STRING", {"default": "", "tooltip": "Optional box around the subject, 'x, y, w, h' pixels "
                                                             "(Subject-Diffusion's test.py prompts SAM with a box)."}),
                "points": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Optional points on the subject, 'x, y' pixels per line."}),
            },
            "optional": {
                "negative_points": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "Optional points on the background, 'x, y' per line."}),
                "points_per_side": ("INT", {"default": 32, "min": 2, "max": 128,
                                            "tooltip": "Automatic mode (no box, no points): grid of point prompts "
                                                       "per side (SAM's default 32)."}),
                "fill_holes": ("BOOLEAN", {"default": True, "tooltip": "Fill holes inside the mask (test.py does)."}),
            },
        }

    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("mask", "subject_on_white")
    OUTPUT_TOOLTIPS = ("The subject mask (1 = subject), one per image.",
                       "The image with everything outside the mask white.")
    FUNCTION = "segment"
    CATEGORY = CATEGORY

    def segment(self, sam_model, image, box="", points="", negative_points="", points_per_side=32, fill_holes=True):
        Sam = sam_lib.sam_class()
        require(isinstance(sam_model, Sam), "sam_model", "a SAM_MODEL from SAM Loader", type(sam_model).__name__)
        require(isinstance(image, torch.Tensor) and image.ndim == 4, "image", "an IMAGE [B, H, W, 3]",
                tuple(getattr(image, "shape", ())))
        h, w = int(image.shape[1]), int(image.shape[2])
        boxes = location.parse_boxes(box, "box")
        require(len(boxes) <= 1, "box", "one box", f"{len(boxes)}")
        bx = boxes[0] if boxes else None
        if bx is not None:
            location.check_box(bx, w, h, "box")
        pos = sam_lib.parse_points(points, "points")
        neg = sam_lib.parse_points(negative_points, "negative_points")
        for name, pts in (("points", pos), ("negative_points", neg)):
            for x, y in pts:
                require(0 <= x < w and 0 <= y < h, name, f"points inside the {w}x{h} image", f"({x}, {y})")
        require(not neg or pos or bx is not None, "points", "at least one positive point or a box with "
                "negative_points", "only negative points")
        masks = torch.stack([sam_lib.segment(sam_model, image[i], bx, pos, neg, int(points_per_side), bool(fill_holes))
                             for i in range(image.shape[0])])
        return (masks, sam_lib.on_white(image, masks))


class SubjectDiffusionTrainer:
    DESCRIPTION = ("Trains Subject-Diffusion's new parts on your images: conv_in (location channel), cross-attention "
                   "key/value, the adapters, the grounding and image-prompt MLPs; loss = MSE + 0.01 x attention "
                   "control (FastComposer balanced L1 on the subjects' masks). Saves to models/subject_diffusion/.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.5 / SD2.x model (4-channel: expanded automatically; or 5)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (frozen; gradients reach the MLP "
                                             "through it)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP vision encoder (frozen; the paper: ViT-H/14)."}),
                "weights": (WEIGHTS, {"tooltip": "Starting point: Zero-Init Weights or loaded weights."}),
                "images": ("IMAGE", {"tooltip": "Training images (sides multiples of 8)."}),
                "masks": ("MASK", {"tooltip": "Subject masks, image-major: subjects_per_image masks per image."}),
                "captions": ("STRING", {"default": "a photo of a dog on the grass", "multiline": True,
                                        "tooltip": "One caption per line per image (one line = all images)."}),
                "labels": ("STRING", {"default": "dog", "multiline": True,
                                      "tooltip": "Per image, one line of comma-separated subject labels (one line = "
                                                 "all images), e.g. 'dog, cat'."}),
                "subjects_per_image": ("INT", {"default": 1, "min": 1, "max": 2,
                                               "tooltip": "1 or 2 subjects per image (the paper: at most 2)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": 3e-5, "min": 0.0, "max": 1.0, "step": 1e-6,
                                            "tooltip": "AdamW learning rate (paper code: 3e-5, weight decay 0)."}),
                "warmup_steps": ("INT", {"default": 1000, "min": 0, "max": 1000000,
                                         "tooltip": "Linear warm-up steps (paper code: 1000)."}),
                "attention_loss_weight": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0, "step": 0.001,
                                                    "tooltip": "Weight of the attention-control loss (paper: "
                                                               "0.01)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of timesteps, noise and dropout."}),
                "save_name": ("STRING", {"default": "subject_diffusion",
                                         "tooltip": "File name in models/subject_diffusion/ (.safetensors added; "
                                                    "sub/folders allowed, '..' not). Also names the resume "
                                                    "checkpoint. Empty = do not save (and no resume)."}),
            },
            "optional": {
                "overwrite": ("BOOLEAN", {"default": True, "tooltip": "Replace an existing file of that name. Off: "
                                                                      "an existing name is an error."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from save_name's last checkpoint "
                                                                   "(.resume file) when a run was cancelled or "
                                                                   "killed."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 1000000,
                                             "tooltip": "Write a resume checkpoint every N steps (0 = only when "
                                                        "cancelled)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Training examples per step."}),
                "training_dtype": (["auto", "fp32", "bf16", "fp16"], {
                    "default": "auto", "tooltip": "Compute precision (trained weights stay fp32). auto: fp32 on CPU, "
                                                  "bf16 (or fp16 with loss scaling) autocast on GPU."}),
            },
        }

    RETURN_TYPES = ("MODEL", WEIGHTS, "STRING")
    RETURN_NAMES = ("model", "weights", "log")
    OUTPUT_TOOLTIPS = ("The model with the trained conv_in and attn2 k/v.", "The trained weights.",
                       "Loss per step and the saved path.")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, clip_vision, weights, images, masks, captions, labels, subjects_per_image=1,
              steps=1000, learning_rate=3e-5, warmup_steps=1000, attention_loss_weight=0.01, seed=0,
              save_name="subject_diffusion", overwrite=True, resume=True, checkpoint_every=100, batch_size=1,
              training_dtype="auto"):
        import comfy.model_management

        from .nodes import subject_training as st
        from .nodes import training_engine as engine

        _check_weights(weights)
        _check_vision(weights, clip_vision)
        require(isinstance(images, torch.Tensor) and images.ndim == 4, "images", "an IMAGE batch",
                tuple(getattr(images, "shape", ())))
        n, s = int(images.shape[0]), int(subjects_per_image)
        require(isinstance(masks, torch.Tensor) and masks.ndim in (2, 3), "masks", "a MASK batch",
                tuple(getattr(masks, "shape", ())))
        if masks.ndim == 2:
            masks = masks.unsqueeze(0)
        require(masks.shape[0] == n * s, "masks", f"{n * s} masks ({n} images x {s} subjects, image-major)",
                masks.shape[0])
        caps = [c for c in captions.splitlines() if c.strip()] or [""]
        labs = [[x.strip() for x in line.split(",") if x.strip()] for line in labels.splitlines() if line.strip()]
        require(len(caps) in (1, n), "captions", f"1 or {n} lines", len(caps))
        require(len(labs) in (1, n), "labels", f"1 or {n} lines", len(labs))
        path = _trainer_save_path(save_name, bool(overwrite))  # checked before training: a bad name costs no run
        examples = [st.Example(images[i], masks[i * s:(i + 1) * s], caps[i % len(caps)], labs[i % len(labs)])
                    for i in range(n)]
        trainer = st.SubjectTrainer(model, clip, vae, clip_vision, weights, examples, lr=learning_rate,
                                    attn_weight=attention_loss_weight, warmup=warmup_steps, seed=int(seed),
                                    batch_size=int(batch_size), training_dtype=training_dtype)
        rpath = engine.checkpoint_path(path) if path else None
        if rpath and resume:
            engine.check_resume_family(rpath, trainer.family)
        log = trainer.train(int(steps), checkpoint=rpath, checkpoint_every=int(checkpoint_every), resume=bool(resume),
                            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        result = trainer.result()
        lines = [f"step {i + 1}: loss {r['loss']:.5f} (mse {r['mse']:.5f}, attn {r['attn']:.5f})"
                 for i, r in enumerate(log)]
        if trainer.last_run.resumed_from:
            lines.append(f"resumed from step {trainer.last_run.resumed_from}")
        if path:
            engine.save_file(result.state_dict(), path, result.metadata(), "Subject-Diffusion weights")
            engine.remove_checkpoint(rpath)
            lines.append(f"saved {path}")
        return (ad.apply_unet(model, result), result, "\n".join(lines))


def _trainer_save_path(save_name: str, overwrite: bool = True) -> str | None:
    """models/subject_diffusion/<save_name>.safetensors through the training engine's one save-name check, or None
    for an empty name (do not save)."""
    import folder_paths

    from .nodes import training_engine as engine

    require(isinstance(save_name, str), "save_name", "a file name", type(save_name).__name__)
    if not save_name.strip():
        return None
    return engine.save_path_for(folder_paths.get_folder_paths("subject_diffusion")[0], save_name.strip(), overwrite)


NODE_CLASS_MAPPINGS = {
    "PersonalizeSubjectDiffusionExpandInputChannels": ExpandInputChannels,
    "PersonalizeSubjectDiffusionLocationMaskConcat": LocationMaskConcat,
    "PersonalizeSubjectDiffusionLoader": SubjectDiffusionLoader,
    "PersonalizeSubjectDiffusionInitWeights": SubjectDiffusionInitWeights,
    "PersonalizeSubjectDiffusionImagePrompt": SubjectImagePrompt,
    "PersonalizeSubjectDiffusionAdapter": SubjectAdapter,
    "PersonalizeSAMLoader": SAMLoader,
    "PersonalizeSubjectMaskSAM": SubjectMaskSAM,
    "PersonalizeSubjectDiffusionTrainer": SubjectDiffusionTrainer,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeSubjectDiffusionExpandInputChannels": "Expand Input Channels (Subject-Diffusion)",
    "PersonalizeSubjectDiffusionLocationMaskConcat": "Location Mask Concat (Subject-Diffusion)",
    "PersonalizeSubjectDiffusionLoader": "Subject-Diffusion Weights Loader",
    "PersonalizeSubjectDiffusionInitWeights": "Subject-Diffusion Zero-Init Weights",
    "PersonalizeSubjectDiffusionImagePrompt": "Subject Image Prompt (Subject-Diffusion)",
    "PersonalizeSubjectDiffusionAdapter": "Subject Adapter (Subject-Diffusion)",
    "PersonalizeSAMLoader": "SAM Loader (Segment Anything)",
    "PersonalizeSubjectMaskSAM": "Subject Mask (SAM)",
    "PersonalizeSubjectDiffusionTrainer": "Subject-Diffusion Trainer",
}
