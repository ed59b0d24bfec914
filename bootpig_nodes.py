"""BootPIG nodes (arXiv 2401.13974): zero-shot subject personalization by Reference Self-Attention.

Thin node classes over ``nodes/``: the RSA engine in ``nodes/reference_attention.py``, the weights format in
``nodes/bootpig_weights.py``, reference preparation in ``nodes/images.py``.
"""
from __future__ import annotations

import os

import torch

from .nodes import bootpig_weights, introspect, mask_sources, paths
from .nodes import sam as sam_lib
from .nodes.errors import InputError, require
from .nodes.images import as_batch, check_masks, subject_on_white
from .nodes.validation import nonfinite_text
from .nodes.reference_attention import (FEATURE_MODES, POOLING_MODES, ReferenceSet, RSASettings, apply_rsa, find_rsa,
                                        has_three_branch_patch, three_branch_guider_class)

CATEGORY = "personalize/BootPIG"
REFERENCE_TYPE = "BOOTPIG_REFERENCE"


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels[..., :3])


class BootPIGReferenceEncoder:
    DESCRIPTION = ("Prepares 1-5 photos of a subject for BootPIG: subject on white (with the optional masks), cropped "
                   "to the subject, padded square, encoded by the VAE. During sampling the reference UNet re-noises "
                   "them to each step's noise level and reads them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The reference UNet: the checkpoint's own model (reference-attention "
                                               "mode, no training needed) or the reference model from BootPIG Loader."}),
                "vae": ("VAE", {"tooltip": "The VAE of the checkpoint, used to encode the reference photos."}),
                "images": ("IMAGE", {"tooltip": "1 to 5 photos of the subject (a batch of one size)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional subject mask, one per image or one for all: outside it the "
                                             "photo is made white and it is cropped to the subject (BootPIG's input). "
                                             "Without a mask the photos should show the subject on white."}),
                "reference_conditioning": ("CONDITIONING", {
                    "tooltip": "Optional prompt for the reference pass, e.g. 'a photo of a dog'. Without it: under "
                               "a KSampler's CFG each reference pass uses the prompt of the image being generated; "
                               "with three-branch guidance (BootPIG Three-Branch Guider, or the RSA node's "
                               "three_branch) the reference is encoded once with the positive prompt and serves both "
                               "reference branches - the official pipeline's default (reference_prompt = prompt)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64,
                                       "tooltip": "Square size the references are resized to before encoding. 0 = the "
                                                  "model's native size (512 SD1.5/SD2, 1024 SDXL)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the fresh noise added to the references at every step."}),
            },
        }

    RETURN_TYPES = (REFERENCE_TYPE,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("Encoded references for BootPIG RSA Patch.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, vae, images, mask=None, reference_conditioning=None, resolution=0, seed=0):
        fam = introspect.family(model, "model")
        images = as_batch(images, "images")
        masks = check_masks(mask, images, "mask")
        require(resolution == 0 or resolution >= 64, "resolution", "0 (native) or at least 64", resolution)
        size = resolution or introspect.NATIVE_RESOLUTION[fam]
        context = None
        if reference_conditioning is not None:
            require(isinstance(reference_conditioning, list) and len(reference_conditioning) > 0,
                    "reference_conditioning", "a CONDITIONING from a text encoder", type(reference_conditioning).__name__)
            context = reference_conditioning[0][0]
            want = introspect.base_model(model).model_config.unet_config.get("context_dim")
            require(context.shape[-1] == want, "reference_conditioning",
                    f"text embeddings of width {want} (this model's text encoder)", f"width {context.shape[-1]}")
            context = context[:1].detach().clone().cpu()
        if images.shape[0] > 5:
            import logging
            logging.warning("BootPIG Reference UNet Encoder: %d references; the paper uses 1-5", images.shape[0])
        pixels = torch.stack([subject_on_white(images[i], None if masks is None else masks[i], size)
                              for i in range(images.shape[0])])
        bm = introspect.base_model(model)
        latents = bm.process_latent_in(_encode(vae, pixels).float().cpu())
        bad = nonfinite_text(latents)
        if bad is not None:
            raise InputError("vae", "a VAE whose encoding of the references is finite (SDXL's VAE overflows "
                             "in fp16: run it in fp32 or use the fp16-fix VAE)", f"an encoding: {bad}")
        want_ch = bm.latent_format.latent_channels
        require(latents.shape[1] == want_ch, "vae", f"a VAE with {want_ch} latent channels (this model's)",
                f"{latents.shape[1]}")
        white = bm.process_latent_in(_encode(vae, torch.ones(1, 64, 64, 3)).float().cpu()).mean(dim=(0, 2, 3))
        return (ReferenceSet(latents=latents, white=white, encoder=model, family=fam, context=context, seed=int(seed)),)


class BootPIGRSAPatch:
    DESCRIPTION = ("Reference Self-Attention: every self-attention block of the model also attends to the reference "
                   "tokens (16 blocks on SD1.5, 70 on SDXL), so the generated subject takes the reference's identity. "
                   "Returns a patched copy of the model; the input model is unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to generate with (the checkpoint's, or the base model "
                                               "from BootPIG Loader)."}),
                "reference": (REFERENCE_TYPE, {"tooltip": "From BootPIG Reference UNet Encoder."}),
                "ref_scale": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 5.0, "step": 0.01,
                                        "tooltip": "Reference tokens are multiplied by this before the key projection "
                                                   "only: sharper attention onto the reference. 1.1 is the official "
                                                   "training value (train_ref_scale, also the inference notebook's); "
                                                   "the official pipeline's constructor defaults to 1.0."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                       "tooltip": "Blend between plain self-attention (0) and RSA (1)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Sampling progress at which RSA starts."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Sampling progress at which RSA ends."}),
                "pooling": (list(POOLING_MODES), {"default": "softmax",
                                                  "tooltip": "Several references: softmax = per-pixel softmax over the "
                                                             "norms of each reference's contribution (paper); argmax = "
                                                             "the strongest per token (official code); concat = one "
                                                             "long sequence; mean = average. One reference: all equal."}),
                "reference_features": (list(FEATURE_MODES), {
                    "default": "per_step",
                    "tooltip": "per_step: re-noise and re-encode the references at every step (BootPIG). once: encode "
                               "them at one noise level (once_percent) per run and reuse them (faster)."}),
                "guidance": (["cfg", "three_branch"], {
                    "default": "cfg",
                    "tooltip": "cfg: the KSampler's CFG, negative prompt without reference. three_branch: BootPIG's "
                               "eps_u + image_scale (eps_ref - eps_u) + text_scale (eps_ref+text - eps_ref) under "
                               "any KSampler; replaces the KSampler's cfg value and costs one more batch per step. "
                               "BootPIG Three-Branch Guider (with SamplerCustomAdvanced) computes the same in one "
                               "batch; leave this on cfg when you use it."}),
            },
            "optional": {
                "once_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "With reference_features = once: the sampling progress whose "
                                                      "noise level the references are encoded at."}),
                "image_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                          "tooltip": "three_branch: image guidance scale (paper: 5.0)."}),
                "text_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                         "tooltip": "three_branch: text guidance scale (paper: 7.5)."}),
                "reference_on_uncond": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "cfg guidance: the negative-prompt rows read the reference too. Off (the paper's "
                               "CFG), the reference's pull is multiplied by the cfg scale, which can flood the frame "
                               "with the reference's colours; on, CFG only adds the prompt. Equals three-branch "
                               "guidance with image_scale 1. Ignored by three-branch guidance."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with Reference Self-Attention; connect it to a KSampler.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, reference, ref_scale=1.1, strength=1.0, start_percent=0.0, end_percent=1.0,
              pooling="softmax", reference_features="per_step", guidance="cfg", once_percent=0.5, image_scale=5.0,
              text_scale=7.5, reference_on_uncond=False):
        require(isinstance(reference, ReferenceSet), "reference", "a BOOTPIG_REFERENCE from BootPIG Reference UNet "
                "Encoder", type(reference).__name__)
        fam = introspect.family(model, "model")
        if reference.family != fam:
            raise InputError("reference", f"references encoded for {introspect.FAMILY_NAMES[fam]} (the base model's "
                             "family)", f"references encoded with an {introspect.FAMILY_NAMES[reference.family]} model")
        introspect.require_same_shape(model, reference.encoder, "reference", "references encoded with")
        require(pooling in POOLING_MODES, "pooling", f"one of {POOLING_MODES}", pooling)
        require(reference_features in FEATURE_MODES, "reference_features", f"one of {FEATURE_MODES}", reference_features)
        require(guidance in ("cfg", "three_branch"), "guidance", "cfg or three_branch", guidance)
        require(start_percent <= end_percent, "start_percent", f"at most end_percent ({end_percent})", start_percent)
        if find_rsa(model) is not None:
            raise InputError("model", "a model without a BootPIG RSA Patch (put several references into one encoder "
                             "instead of chaining patches)", "a model that already has one")
        ms = model.get_model_object("model_sampling")
        enc = reference.encoder
        shared = (enc.model is model.model and enc.patches_uuid == model.patches_uuid
                  and len(enc.patches) == len(model.patches))
        settings = RSASettings(ref_scale=float(ref_scale), strength=float(strength),
                               sigma_start=float(ms.percent_to_sigma(start_percent)),
                               sigma_end=float(ms.percent_to_sigma(end_percent)), pooling=pooling,
                               features=reference_features, once_sigma=float(ms.percent_to_sigma(once_percent)),
                               batched=shared, uncond_reference=bool(reference_on_uncond))
        if guidance == "three_branch":
            return (apply_rsa(model, reference, settings, image_scale, text_scale),)
        return (apply_rsa(model, reference, settings),)


class BootPIGThreeBranchGuider:
    DESCRIPTION = ("BootPIG's three-branch guidance as a guider for SamplerCustomAdvanced: eps_u + image_scale "
                   "(eps_ref - eps_u) + text_scale (eps_ref+text - eps_ref), where eps_u is the negative prompt without "
                   "the reference, eps_ref the negative prompt with it, eps_ref+text the prompt with it. All three "
                   "branches and the reference rows run in one batched UNet call; the reference is encoded with the "
                   "reference prompt (the encoder's reference_conditioning, or the positive prompt) in both "
                   "reference branches, as in the official pipeline.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from BootPIG RSA Patch (its guidance left on cfg)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt (eps_ref+text); also the reference prompt unless the "
                                                     "encoder was given reference_conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt (eps_u and eps_ref)."}),
            "image_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                      "tooltip": "Image guidance scale (paper and official pipeline: 5.0; the "
                                                 "notebook uses 4.0 at 25 UniPC steps)."}),
            "text_scale": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                     "tooltip": "Text guidance scale (paper and official pipeline: 7.5; notebook: "
                                                "6.5). Equal scales give plain CFG at that scale."}),
        }}

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A guider for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY

    def get_guider(self, model, positive, negative, image_scale=5.0, text_scale=7.5):
        introspect.family(model, "model")
        if find_rsa(model) is None:
            raise InputError("model", "a model from BootPIG RSA Patch", "a model without Reference Self-Attention")
        if has_three_branch_patch(model):
            raise InputError("model", "a BootPIG RSA Patch with guidance = cfg (this guider does the three branches)",
                             "a patch whose guidance is three_branch")
        for name, v in (("image_scale", image_scale), ("text_scale", text_scale)):
            require(isinstance(v, (int, float)) and v == v and abs(v) != float("inf"), name, "a finite number", v)
        guider = three_branch_guider_class()(model)
        guider.set_conds(positive, negative)
        guider.set_scales(image_scale, text_scale)
        return (guider,)


def _bootpig_choices() -> list[str]:
    import folder_paths

    names = list(paths.list_files("bootpig"))
    for root in folder_paths.get_folder_paths("bootpig"):
        if os.path.isdir(root):
            for d in sorted(os.listdir(root)):
                if os.path.isdir(os.path.join(root, d, "ref_unet")):
                    names.append(d + "/")
    return names


class BootPIGLoader:
    DESCRIPTION = ("Loads trained BootPIG weights from models/bootpig/: a .safetensors file in the pack's format, or "
                   "a folder with ref_unet/ and base_unet/ as the official training code writes them. Outputs the "
                   "base model with its trained self-attention and the trained reference UNet.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The checkpoint the BootPIG weights were trained from (same family)."}),
            "bootpig_name": (_bootpig_choices(), {"tooltip": "Weights in models/bootpig/. Can be linked to BootPIG "
                                                             "Trainer's bootpig_name output."}),
        }}

    RETURN_TYPES = ("MODEL", "MODEL")
    RETURN_NAMES = ("base_model", "reference_model")
    OUTPUT_TOOLTIPS = ("Base model with the trained attn1 weights: connect to BootPIG RSA Patch.",
                       "Trained reference UNet: connect to BootPIG Reference UNet Encoder.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None, bootpig_name=None):
        """``bootpig_name`` may also be linked to BootPIG Trainer's ``bootpig_name`` (a STRING): a file that does
        not exist until the trainer has run, so the host's list check is replaced by this one (and the file is
        checked when it loads). Declaring ``input_types`` turns off the host's type check of links: done here."""
        types = input_types or {}
        if types.get("model", "MODEL") != "MODEL":
            return f"model: expected a MODEL link, got {types['model']}"
        if "bootpig_name" in types:
            t = types["bootpig_name"]
            return True if (t == "STRING" or isinstance(t, (list, tuple))) else \
                f"bootpig_name: expected a file name (a STRING, e.g. BootPIG Trainer's bootpig_name), got {t}"
        if bootpig_name is None or bootpig_name in _bootpig_choices() or (
                isinstance(bootpig_name, str) and os.path.isabs(bootpig_name) and os.path.exists(bootpig_name)):
            return True
        return f"bootpig_name: '{bootpig_name}' is not in models/bootpig/"

    def load(self, model, bootpig_name):
        import folder_paths

        path = None
        if bootpig_name.endswith("/"):
            for root in folder_paths.get_folder_paths("bootpig"):
                cand = os.path.join(root, bootpig_name.rstrip("/"))
                if os.path.isdir(cand):
                    path = cand
                    break
            if path is None:
                raise InputError("bootpig_name", "a folder in models/bootpig/", repr(bootpig_name))
        elif os.path.isabs(bootpig_name) and os.path.exists(bootpig_name):
            path = bootpig_name
        else:
            path = paths.full_path("bootpig", bootpig_name)
        ref_sd, attn1_sd, _ = bootpig_weights.load(path, model)
        return bootpig_weights.apply(model, ref_sd, attn1_sd)


TRAIN_PARTS = {"reference UNet + RSA": (True, True), "RSA only": (False, True), "reference UNet only": (True, False)}


def _bootpig_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("bootpig")[0]


class BootPIGTrainerNode:
    DESCRIPTION = ("Trains BootPIG on a bootstrap dataset (BootPIG Bootstrap Dataset, or a folder of your own "
                   "target / reference / caption triplets): the whole reference UNet and the base UNet's "
                   "self-attention (attn1) layers, with the paper's recipe (reference noised at the target's "
                   "timestep, reference and caption dropout 0.15, ref_scale 1.1, AdamW, clipping 1.0, 200 warm-up "
                   "steps). Saves the pack's BootPIG weights into models/bootpig for the BootPIG Loader and returns "
                   "the trained base and reference models. Cancel stops it; rerunning with the same save name "
                   "resumes from the last checkpoint.")

    @classmethod
    def INPUT_TYPES(cls):
        from .nodes.training_engine import TRAINING_DTYPES

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's model (SD1.5, SD2.x or SDXL): both UNets start from "
                                               "it. It is not modified: training runs on copies."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (frozen): encodes the captions."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE (frozen): encodes targets and references."}),
                "dataset": ("STRING", {"default": "bootpig_dataset",
                                       "tooltip": "A dataset in output/bootpig_datasets/ (link BootPIG Bootstrap "
                                                  "Dataset's output here), or an absolute folder path."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000,
                                  "tooltip": "Optimizer steps (paper: 10k at a global batch of 64)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                                       "tooltip": "Triplets per step (per process under torchrun)."}),
                "train": (list(TRAIN_PARTS), {"default": "reference UNet + RSA",
                                              "tooltip": "What trains: both (paper), or one part for the paper's "
                                                         "ablation."}),
                "reference_unet_lr": ("FLOAT", {"default": 5e-6, "min": 0.0, "max": 1.0, "step": 1e-7,
                                                "round": False,
                                                "tooltip": "Learning rate of the reference UNet (paper: 5e-6)."}),
                "rsa_lr": ("FLOAT", {"default": 1e-6, "min": 0.0, "max": 1.0, "step": 1e-7, "round": False,
                                     "tooltip": "Learning rate of the base UNet's attn1 layers (paper: 1e-6; the "
                                                "official config 1e-7)."}),
                "save_name": ("STRING", {"default": "bootpig_trained",
                                         "tooltip": "File name in models/bootpig (.safetensors added). Also names "
                                                    "the resume checkpoint."}),
            },
            "optional": {
                "ref_scale": ("FLOAT", {"default": 1.1, "min": 0.0, "max": 5.0, "step": 0.01,
                                        "tooltip": "Key scale of the reference tokens in training (official: 1.1); "
                                                   "use the same value in the RSA Patch."}),
                "reference_dropout": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 0.99, "step": 0.01,
                                                "tooltip": "Probability that a whole batch trains without references "
                                                           "(plain self-attention; paper 0.15)."}),
                "caption_dropout": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 0.99, "step": 0.01,
                                              "tooltip": "Probability that a target's caption is emptied (paper "
                                                         "0.15): classifier-free guidance keeps working."}),
                "augment": ("BOOLEAN", {"default": True,
                                        "tooltip": "Reference augmentations: foreground resize and position, flip, "
                                                   "colour jitter (p 0.1), random erasing (p 0.4)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                       "tooltip": "Training size; 0 = the dataset's own image size."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the batches, noise, dropout and augmentations."}),
                "warmup_steps": ("INT", {"default": 200, "min": 0, "max": 100000,
                                         "tooltip": "Linear warm-up steps, then a constant rate (official)."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                             "tooltip": "Write a resume checkpoint every N steps (0 = only on "
                                                        "cancel)."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from save_name's last checkpoint."}),
                "training_dtype": (list(TRAINING_DTYPES), {"default": "auto",
                                                           "tooltip": "auto: fp32 on CPU, bf16 autocast on GPUs."}),
                "save_dtype": (["fp16", "bf16", "fp32"], {"default": "fp16",
                                                          "tooltip": "Precision of the saved weights."}),
            },
        }

    RETURN_TYPES = ("MODEL", "MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("base_model", "reference_model", "bootpig_name", "loss_curve")
    OUTPUT_TOOLTIPS = ("Base model with the trained attn1 weights: connect to BootPIG RSA Patch.",
                       "Trained reference UNet: connect to BootPIG Reference UNet Encoder.",
                       "The saved file's name in models/bootpig, for BootPIG Loader.",
                       "Loss per step.")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, dataset, steps=1000, batch_size=4, train="reference UNet + RSA",
              reference_unet_lr=5e-6, rsa_lr=1e-6, save_name="bootpig_trained", ref_scale=1.1,
              reference_dropout=0.15, caption_dropout=0.15, augment=True, resolution=0, seed=0, warmup_steps=200,
              checkpoint_every=100, overwrite=False, resume=True, training_dtype="auto", save_dtype="fp16"):
        import comfy.model_management

        from .nodes import bootpig_data, bootpig_training, training_engine
        from .nodes.training_engine import loss_curve_image

        require(train in TRAIN_PARTS, "train", f"one of {list(TRAIN_PARTS)}", train)
        ref_on, rsa_on = TRAIN_PARTS[train]
        cfg = bootpig_training.BootPIGConfig(
            steps=int(steps), batch_size=int(batch_size), reference_unet_lr=float(reference_unet_lr),
            rsa_lr=float(rsa_lr), train_reference_unet=ref_on, train_rsa=rsa_on, ref_scale=float(ref_scale),
            reference_dropout=float(reference_dropout), caption_dropout=float(caption_dropout), augment=bool(augment),
            warmup_steps=int(warmup_steps), resolution=int(resolution), seed=int(seed),
            training_dtype=training_dtype, checkpoint_every=int(checkpoint_every), save_dtype=save_dtype)
        bootpig_training.validate_config(cfg)
        folder = bootpig_data.dataset_dir(dataset, "dataset")
        name = training_engine.sanitize_save_name(save_name)
        path = training_engine.save_path_for(_bootpig_dir(), name, bool(overwrite))
        result = bootpig_training.train(model, clip, vae, folder, cfg, path, overwrite=bool(overwrite),
                                        resume=bool(resume),
                                        check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        base, ref = bootpig_weights.apply(model, result.reference_unet, result.base_attn1)
        curve = loss_curve_image([(s, {"loss": v}) for s, v in result.losses], ["loss"])
        return (base, ref, name + ".safetensors", curve)


CAPTION_SOURCES = ("built-in", "toy world", "from text")


def caption_grammar(captions: str, caption_text: str = ""):
    """The caption grammar a node's ``captions`` / ``caption_text`` inputs name."""
    from .nodes.bootpig_data import CaptionGrammar

    require(captions in CAPTION_SOURCES, "captions", f"one of {list(CAPTION_SOURCES)}", repr(captions))
    if captions == "built-in":
        return CaptionGrammar.general()
    if captions == "toy world":
        from .toyworld.captions import ToyCaptions

        return ToyCaptions()
    return CaptionGrammar.from_text(caption_text or "", "caption_text")


class BootPIGBootstrapNode:
    DESCRIPTION = ("Makes BootPIG training data from the model itself (paper §3.4): captions 'a photo of a "
                   "[object], [position] [scene]' from a caption grammar, a target image per caption sampled by "
                   "the model with ComfyUI's sampling, a subject mask per target from a mask source; targets whose "
                   "mask touches the border are set aside, and the reference is the foreground on white. Writes a "
                   "dataset folder in output/bootpig_datasets/ that BootPIG Trainer reads; rerunning continues it "
                   "(or extends it to a larger count).")

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's model: it draws the targets (BootPIG trains on the "
                                               "model's own images)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder, for the captions."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to decode the targets."}),
                "mask_source": (mask_sources.TYPE, {"tooltip": "Segments each target: Mask Source (SAM) for real "
                                                               "checkpoints, Toy World Segmenter for the toy model."}),
                "dataset": ("STRING", {"default": "bootpig_dataset",
                                       "tooltip": "Dataset name in output/bootpig_datasets/ (or an absolute "
                                                  "folder). The same name and settings continue a dataset."}),
                "count": ("INT", {"default": 1000, "min": 1, "max": 10000000,
                                  "tooltip": "Targets to sample (kept + set aside; the paper made 200,000)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the captions; item i is sampled with noise seed seed + i."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 10000, "tooltip": "Sampling steps per target."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                                                                    "tooltip": "ComfyUI sampler of the targets."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal",
                                                                   "tooltip": "ComfyUI scheduler of the targets."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                                  "tooltip": "Target width (the model's native size is best)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 8, "tooltip": "Target height."}),
                "captions": (list(CAPTION_SOURCES), {"default": "built-in",
                                                     "tooltip": "built-in: the pack's object / position / scene "
                                                                "lists; toy world: the toy model's vocabulary; from "
                                                                "text: caption_text."}),
            },
            "optional": {
                "caption_text": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "With captions = from text: one caption per line, or "
                                                       "sections 'objects:', 'positions:', 'scenes:' with one entry "
                                                       "per line. # starts a comment."}),
                "negative": ("STRING", {"default": "", "tooltip": "Negative prompt of every target."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256,
                                       "tooltip": "Targets sampled together (faster on a GPU; same noise per item)."}),
                "border": ("INT", {"default": -1, "min": -1, "max": 4096,
                                   "tooltip": "A target whose mask comes within this many px of the edge is set "
                                              "aside. -1 = 25 px at 512 (the released generator), scaled."}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "Start the dataset afresh when its folder was made with other "
                                                     "settings (otherwise that is an error)."}),
            },
        }

    RETURN_TYPES = ("STRING", "INT", "IMAGE")
    RETURN_NAMES = ("dataset", "kept", "preview")
    OUTPUT_TOOLTIPS = ("The dataset's name or folder: connect to BootPIG Trainer's dataset.",
                       "Triplets kept (the rest touched the border or had no mask; see discarded/).",
                       "Target | mask | reference of the first kept triplets.")
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, model, clip, vae, mask_source, dataset, count=1000, seed=0, steps=25, cfg=7.0,
             sampler_name="euler", scheduler="normal", width=512, height=512, captions="built-in", caption_text="",
             negative="", batch_size=1, border=-1, overwrite=False):
        from .nodes import bootpig_data

        folder = bootpig_data.dataset_dir(dataset, "dataset")
        grammar = caption_grammar(captions, caption_text)
        settings = bootpig_data.BootstrapSettings(
            count=int(count), seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=sampler_name,
            scheduler=scheduler, width=int(width), height=int(height), batch_size=int(batch_size),
            negative=str(negative), border=int(border))
        r = bootpig_data.bootstrap(model, clip, vae, mask_source, folder, settings, grammar, overwrite=bool(overwrite))
        return (dataset, r.kept, r.preview)


class MaskSourceSAMNode:
    DESCRIPTION = ("A mask source over Segment Anything, for BootPIG Bootstrap Dataset: each image's most central "
                   "automatic mask, holes filled.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sam_model": (sam_lib.SAM_MODEL, {"tooltip": "From SAM Loader (a checkpoint in models/sams)."}),
            "points_per_side": ("INT", {"default": 16, "min": 4, "max": 64,
                                        "tooltip": "Grid of SAM's automatic mask generator (more: finer, slower)."}),
        }}

    RETURN_TYPES = (mask_sources.TYPE,)
    RETURN_NAMES = ("mask_source",)
    OUTPUT_TOOLTIPS = ("Segments images for BootPIG Bootstrap Dataset.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, sam_model, points_per_side=16):
        require(isinstance(sam_model, sam_lib.sam_class()), "sam_model", "a SAM model from SAM Loader",
                type(sam_model).__name__)
        return (mask_sources.SAMMaskSource(sam_model, int(points_per_side)),)


NODE_CLASS_MAPPINGS = {
    "PersonalizeBootPIGReferenceEncoder": BootPIGReferenceEncoder,
    "PersonalizeBootPIGRSAPatch": BootPIGRSAPatch,
    "PersonalizeBootPIGLoader": BootPIGLoader,
    "PersonalizeBootPIGThreeBranchGuider": BootPIGThreeBranchGuider,
    "PersonalizeBootPIGTrainer": BootPIGTrainerNode,
    "PersonalizeBootPIGBootstrap": BootPIGBootstrapNode,
    "PersonalizeMaskSourceSAM": MaskSourceSAMNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizeBootPIGReferenceEncoder": "BootPIG Reference UNet Encoder",
    "PersonalizeBootPIGRSAPatch": "BootPIG RSA Patch",
    "PersonalizeBootPIGLoader": "BootPIG Loader",
    "PersonalizeBootPIGThreeBranchGuider": "BootPIG Three-Branch Guider",
    "PersonalizeBootPIGTrainer": "BootPIG Trainer",
    "PersonalizeBootPIGBootstrap": "BootPIG Bootstrap Dataset",
    "PersonalizeMaskSourceSAM": "Mask Source (SAM)",
}
