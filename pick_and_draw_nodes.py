"""Pick-and-Draw nodes (arXiv 2401.16762): training-free appearance picking and layout drawing guidance.

Thin node classes over the guidance engine in ``nodes/pick_and_draw.py`` (one backward pass per guided step over the sum
of the active losses). Chain: MODEL -> Appearance Picking Guidance -> Layout Drawing Guidance -> KSampler, or after a
BootPIG RSA Patch / LoRA loader.

The subject word is located in the prompt with the CLIP tokenizer: the guidance nodes take the CLIP and the prompt
text (the same text as the positive CLIPTextEncode), because a CONDITIONING carries embeddings, not tokens.
"""
from __future__ import annotations

import torch.nn.functional as F

from .nodes import introspect
from .nodes import pick_and_draw as guidance
from .nodes.errors import InputError, require
from .nodes.images import as_batch, check_masks
from .nodes.validation import nonfinite_text

CATEGORY = "personalize/PickAndDraw"
REFERENCE_TYPE = "PICK_AND_DRAW_REFERENCE"

_RANGE_TIPS = {
    "start": "Sampling progress (0 = first step) at which this guidance starts.",
    "end": "Sampling progress at which it stops (exclusive; start == end guides nothing).",
}


def _prompt_inputs(word_default: str):
    return {
        "clip": ("CLIP", {"tooltip": "The text encoder of the checkpoint: its tokenizer finds the subject word's "
                                     "tokens in the prompt."}),
        "prompt": ("STRING", {"multiline": True, "default": "a photo of a dog",
                              "tooltip": "The positive prompt, exactly the text encoded for the sampler's positive "
                                         "conditioning."}),
        "subject_word": ("STRING", {"default": word_default,
                                    "tooltip": "The word of the prompt naming the subject (e.g. the DreamBooth "
                                               "identifier 'sks' or 'dog'); its cross-attention maps locate the "
                                               "subject."}),
    }


def _check_common(model, weight, start_percent, end_percent):
    introspect.family(model, "model")
    require(start_percent <= end_percent, "start_percent", f"at most end_percent ({end_percent})", start_percent)
    require(weight >= 0.0, "weight", "a weight >= 0", weight)


class PickAndDrawReference:
    DESCRIPTION = ("Encodes one reference photo of the subject for Appearance Picking Guidance, with an optional "
                   "subject mask. Without a mask the subject region is picked from the reference's own "
                   "cross-attention map of the subject word, thresholded at tau (Pick-and-Draw).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the guidance will run on (its family and latent format)."}),
                "vae": ("VAE", {"tooltip": "The VAE of the checkpoint, to encode the reference."}),
                "image": ("IMAGE", {"tooltip": "One photo of the subject (the first image of a batch is used)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask, 1 = subject, the image's size; it must mark some "
                                             "pixels. LoadImage's MASK of a cut-out PNG marks the transparent "
                                             "background: pass it through InvertMask first."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                       "tooltip": "Longer side the reference is resized to before encoding (kept to a "
                                                  "multiple of 8). 0 = the model's native size (512 SD1.5, 1024 SDXL)."}),
            },
        }

    RETURN_TYPES = (REFERENCE_TYPE,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("The encoded reference: connect to Appearance Picking Guidance.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, vae, image, mask=None, resolution=0):
        fam = introspect.family(model, "model")
        images = as_batch(image, "image")
        if mask is not None and float(mask.max()) <= 0.0:
            raise InputError("mask", "a mask that marks the subject (1 = subject)", "an empty mask",
                             "LoadImage outputs an empty MASK for an image without transparency: leave the mask "
                             "unconnected (the subject is then picked by its cross-attention map) or draw one")
        if images.shape[0] > 1:
            import logging
            logging.getLogger("personalize").warning("Pick-and-Draw Reference Encoder: %d images given; the first is "
                                                     "used (Pick-and-Draw takes a single reference)", images.shape[0])
        images = images[:1]
        masks = check_masks(mask[:1] if mask is not None and mask.ndim == 3 else mask, images, "mask")
        require(resolution == 0 or resolution >= 64, "resolution", "0 (native) or at least 64", resolution)
        size = resolution or introspect.NATIVE_RESOLUTION[fam]
        h, w = images.shape[1:3]
        s = size / max(h, w)
        nh, nw = max(8, int(round(h * s / 8)) * 8), max(8, int(round(w * s / 8)) * 8)
        px = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(nh, nw), mode="bicubic", align_corners=False,
                           antialias=True).clamp(0, 1).permute(0, 2, 3, 1)
        bm = introspect.base_model(model)
        latent = bm.process_latent_in(vae.encode(px[..., :3]).float().cpu())
        bad = nonfinite_text(latent)
        if bad is not None:
            raise InputError("vae", "a VAE whose encoding of the reference is finite (SDXL's VAE overflows "
                             "in fp16: run it in fp32 or use the fp16-fix VAE)", f"an encoding: {bad}")
        want = bm.latent_format.latent_channels
        require(latent.shape[1] == want, "vae", f"a VAE with {want} latent channels (this model's)",
                f"{latent.shape[1]}")
        lmask = None
        if masks is not None:
            m = masks[:1].float().unsqueeze(1)
            lm = F.interpolate(m, size=latent.shape[-2:], mode="area")[0, 0]
            lmask = (lm >= 0.5).float() if bool((lm >= 0.5).any()) else (lm > 0).float()
        return (guidance.Reference(latent=latent.detach().clone(), mask=lmask, family=fam),)


class AppearancePickingGuidance:
    DESCRIPTION = ("Pick-and-Draw appearance picking: during the chosen steps the latent is moved by gradient descent "
                   "so that the generated subject's features (where the subject word's cross-attention >= tau) are "
                   "each close (cosine) to some feature of the reference (unidirectional relaxed EMD). Training-free; "
                   "works on vanilla SD, LoRA/DreamBooth or BootPIG-patched models. Returns a patched copy.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {
            "model": ("MODEL", {"tooltip": "The (personalized or vanilla) model to sample with."}),
            "reference": (REFERENCE_TYPE, {"tooltip": "From Pick-and-Draw Reference Encoder."}),
        }
        req.update(_prompt_inputs("dog"))
        req.update({
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                 "tooltip": "Multiplies the appearance loss (0 = off: sampling is unchanged)."}),
            "start_percent": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": _RANGE_TIPS["start"]}),
            "end_percent": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": _RANGE_TIPS["end"]}),
            "iterations": ("INT", {"default": 1, "min": 1, "max": 20,
                                   "tooltip": "Gradient steps per guided sampling step (each: one forward to the last "
                                              "layer read + one backward)."}),
            "step_size": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                    "tooltip": "eta: latent step per unit loss gradient, in the UNet's input space "
                                               "(Attend-and-Excite's 20)."}),
            "step_size_schedule": (list(guidance.SCHEDULES), {
                "default": "linear_decay",
                "tooltip": "linear_decay: eta falls linearly to eta/2 over the guided steps (Attend-and-Excite). "
                           "constant: eta at every guided step."}),
            "layers": ("STRING", {"default": "decoder_mid",
                                  "tooltip": "Cross-attention blocks whose features form the palette and whose maps "
                                             "pick the subject: decoder_mid (decoder at half the latent resolution: "
                                             "SD1.5 output 6-8, SDXL output 3-5), decoder, all, or a list like "
                                             "'output.6, output.7'."}),
            "tau": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Saliency threshold on the subject's cross-attention map (min-max "
                                         "normalised) for the generated subject and, without a mask, the reference."}),
            "reference_noise": (list(guidance.REFERENCE_NOISE), {
                "default": "ddim_inversion",
                "tooltip": "How the reference reaches each step's noise level: ddim_inversion (deterministic, one "
                           "UNet pass per schedule step up to the range, once per run) or renoise (fresh noise, "
                           "cheaper)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the reference noise with reference_noise = renoise."}),
        })
        return {"required": req}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with appearance guidance; chain Layout Drawing Guidance or connect a KSampler.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, reference, clip, prompt, subject_word, weight=1.0, start_percent=0.3, end_percent=0.8,
              iterations=1, step_size=20.0, step_size_schedule="linear_decay", layers="decoder_mid", tau=0.5,
              reference_noise="ddim_inversion", seed=0):
        _check_common(model, weight, start_percent, end_percent)
        fam = introspect.family(model, "model")
        require(isinstance(reference, guidance.Reference), "reference",
                "a PICK_AND_DRAW_REFERENCE from Pick-and-Draw Reference Encoder", type(reference).__name__)
        if reference.family != fam:
            raise InputError("reference", f"a reference encoded for {introspect.FAMILY_NAMES[fam]} (the model's "
                             "family)", f"one encoded with an {introspect.FAMILY_NAMES[reference.family]} model")
        if reference.mask is not None and not bool(reference.mask.any()):
            raise InputError("reference", "a reference whose mask marks the subject", "an empty mask")
        require(step_size_schedule in guidance.SCHEDULES, "step_size_schedule", f"one of {guidance.SCHEDULES}",
                step_size_schedule)
        require(reference_noise in guidance.REFERENCE_NOISE, "reference_noise", f"one of {guidance.REFERENCE_NOISE}",
                reference_noise)
        require(0.0 <= tau <= 1.0, "tau", "a threshold in [0, 1]", tau)
        require(iterations >= 1, "iterations", "at least 1", iterations)
        positions, _ = guidance.word_positions(clip, prompt, subject_word)
        keys = guidance.parse_layers(model, layers, "layers")
        term = guidance.AppearanceTerm(
            weight=float(weight), steps=guidance.StepRange.from_percent(model, start_percent, end_percent),
            layers=keys, positions=positions, tau=float(tau), step_size=float(step_size),
            schedule=step_size_schedule, iterations=int(iterations), reference=reference,
            reference_noise=reference_noise, seed=int(seed), prompt_context=guidance.prompt_context(clip, prompt))
        return (guidance.add_term(model, term),)


class LayoutDrawingGuidance:
    DESCRIPTION = ("Pick-and-Draw layout drawing: during the chosen steps the latent is moved so that the subject "
                   "word's cross-attention maps (Gaussian-smoothed) follow the maps of the class word in a template "
                   "model (the un-personalized base) on the same latent: Frobenius norm of their difference, summed "
                   "over layers. Shares one backward pass with Appearance Picking Guidance. Returns a patched copy.")

    @classmethod
    def INPUT_TYPES(cls):
        req = {"model": ("MODEL", {"tooltip": "The (personalized) model to sample with."})}
        req.update(_prompt_inputs("dog"))
        req.update({
            "class_word": ("STRING", {"default": "dog",
                                      "tooltip": "The class noun: the template prompt is the prompt with the subject "
                                                 "word replaced by this word."}),
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                 "tooltip": "Multiplies the layout loss (0 = off: sampling is unchanged)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": _RANGE_TIPS["start"]}),
            "end_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": _RANGE_TIPS["end"]}),
            "iterations": ("INT", {"default": 1, "min": 1, "max": 20,
                                   "tooltip": "Gradient steps per guided sampling step. Chained with Appearance "
                                              "Picking Guidance, a step runs the larger count, every active loss in "
                                              "every iteration (one backward over their sum)."}),
            "step_size": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                    "tooltip": "eta for the layout loss, in the UNet's input space."}),
            "step_size_schedule": (list(guidance.SCHEDULES), {
                "default": "linear_decay", "tooltip": "linear_decay (eta -> eta/2 over the range) or constant."}),
            "smoothing_sigma": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "Gaussian sigma, in cells of each layer's token grid, applied "
                                                     "to both maps before the difference (0 = none)."}),
            "layers": ("STRING", {"default": "all",
                                  "tooltip": "Cross-attention blocks compared: all (every cross-attention layer, as "
                                             "the paper), decoder, decoder_mid, or a list like 'output.3, input.7'."}),
        })
        return {"required": req, "optional": {
            "template_model": ("MODEL", {"tooltip": "The un-personalized model (a separately loaded base checkpoint). "
                                                    "Absent: this model's weights with every attention patch and "
                                                    "wrapper removed (LoRA weights merged into the same weights "
                                                    "cannot be removed mid-sampling)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with layout guidance; connect a KSampler.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, clip, prompt, subject_word, class_word, weight=1.0, start_percent=0.0, end_percent=0.5,
              iterations=1, step_size=20.0, step_size_schedule="linear_decay", smoothing_sigma=0.5, layers="all",
              template_model=None):
        _check_common(model, weight, start_percent, end_percent)
        if template_model is not None:  # family and size first: before any text encoding
            fam, tfam = introspect.family(model, "model"), introspect.family(template_model, "template_model")
            if tfam != fam:
                raise InputError("template_model", f"an {introspect.FAMILY_NAMES[fam]} model (the model's family)",
                                 introspect.FAMILY_NAMES[tfam])
            introspect.require_same_shape(model, template_model, "template_model", "a template model:")
        require(step_size_schedule in guidance.SCHEDULES, "step_size_schedule", f"one of {guidance.SCHEDULES}",
                step_size_schedule)
        require(iterations >= 1, "iterations", "at least 1", iterations)
        require(smoothing_sigma >= 0.0, "smoothing_sigma", "a sigma >= 0", smoothing_sigma)
        require(isinstance(class_word, str) and class_word.strip() != "", "class_word", "a class noun such as 'dog'",
                repr(class_word))
        positions, _ = guidance.word_positions(clip, prompt, subject_word)
        template_prompt = guidance.replace_word(prompt, subject_word, class_word)
        tpositions, _ = guidance.word_positions(clip, template_prompt, class_word, "class_word", "template prompt")
        context = guidance.encode_text(clip, template_prompt)
        want = introspect.base_model(model).model_config.unet_config.get("context_dim")
        require(context.shape[-1] == want, "clip", f"the text encoder of this model (width {want})",
                f"width {context.shape[-1]}")
        keys = guidance.parse_layers(model, layers, "layers")
        template = None
        if template_model is not None:
            if template_model.model is not model.model:
                template = template_model
            else:
                import logging
                logging.getLogger("personalize").warning(
                    "Layout Drawing Guidance: template_model shares its weights with model; the template runs on the "
                    "weights loaded for sampling (weight patches such as a LoRA stay applied), without attention "
                    "patches. Load the base checkpoint separately for a vanilla template.")
        term = guidance.LayoutTerm(
            weight=float(weight), steps=guidance.StepRange.from_percent(model, start_percent, end_percent),
            layers=keys, positions=positions, template_positions=tpositions, template_context=context,
            smoothing_sigma=float(smoothing_sigma), step_size=float(step_size), schedule=step_size_schedule,
            template=template, iterations=int(iterations), prompt_context=guidance.prompt_context(clip, prompt))
        return (guidance.add_term(model, term),)


NODE_CLASS_MAPPINGS = {
    "PersonalizePickAndDrawReference": PickAndDrawReference,
    "PersonalizeAppearancePickingGuidance": AppearancePickingGuidance,
    "PersonalizeLayoutDrawingGuidance": LayoutDrawingGuidance,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizePickAndDrawReference": "Pick-and-Draw Reference Encoder",
    "PersonalizeAppearancePickingGuidance": "Appearance Picking Guidance (Pick-and-Draw)",
    "PersonalizeLayoutDrawingGuidance": "Layout Drawing Guidance (Pick-and-Draw)",
}
