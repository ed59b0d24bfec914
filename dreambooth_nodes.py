"""DreamBooth-LoRA (arXiv 2208.12242 with LoRA; papers.md §D): train a subject LoRA inside the graph.

Thin node class over ``nodes/dreambooth.py`` (class images, the trainer; the loop is ``nodes/training_engine.py``)
and ``nodes/lora.py`` (LoRA modules, kohya-format keys). The same loop runs headless:
``python -m scripts.train_dreambooth``.
"""
from __future__ import annotations

import os

from .nodes import dreambooth
from .nodes.errors import require

CATEGORY = "personalize/DreamBooth"
CLASS_CACHE = "personalize_class_images"


def _loras_dir() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def _class_cache_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), CLASS_CACHE)


class DreamBoothLoRATrainer:
    DESCRIPTION = ("DreamBooth LoRA with prior preservation: learns a subject from 3-5 photos so that the instance "
                   "prompt ('a photo of sks dog') draws it. Class images of the plain class are sampled by the frozen "
                   "model and cached; each step trains on instance and class examples together (loss = instance MSE "
                   "+ prior weight x class MSE). Saves a LoRA into models/loras with kohya's keys (SD1.5/SD2: "
                   "diffusers paths; SDXL: LDM paths): ComfyUI's LoraLoader maps every key (tested); kohya's tools "
                   "and A1111/Forge read the same naming. It returns the model and CLIP with it applied. Cancel "
                   "stops it; rerunning with the same save name resumes from the last checkpoint.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's model (SD1.5, SD2.x or SDXL). It is not modified: "
                                               "training runs on a copy."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder: encodes the prompts (and is trained too "
                                             "with train_text_encoder)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: encodes the instance photos."}),
                "instance_images": ("IMAGE", {"tooltip": "3-5 photos of the subject (paper: 3-5). They are center "
                                                         "cropped to square and resized to the resolution."}),
                "class_noun": ("STRING", {"default": "dog", "tooltip": "The subject's class, e.g. dog, backpack, "
                                                                       "person; fills {class} in the prompts."}),
                "instance_prompt": ("STRING", {"default": "a photo of sks {class}", "multiline": False,
                                               "tooltip": "Prompt of the instance photos with a rare identifier "
                                                          "('sks', the diffusers / community choice for SD)."}),
                "class_prompt": ("STRING", {"default": "a photo of {class}", "multiline": False,
                                            "tooltip": "Prompt of the class images the frozen model samples for the "
                                                       "prior-preservation loss (diffusers README: 'a photo of dog')."}),
                "num_class_images": ("INT", {"default": 100, "min": 1, "max": 10000,
                                             "tooltip": "Class images to sample (diffusers default 100; README 200). "
                                                        "Cached by model + prompt + count + seed: a rerun reuses them."}),
                "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                "tooltip": "Weight of the class (prior-preservation) loss, lambda in "
                                                           "the paper (1.0). 0 = no class images, plain fine-tuning."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 1024,
                                 "tooltip": "LoRA rank (diffusers and kohya default 4)."}),
                "alpha": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                    "tooltip": "LoRA alpha; the update is scaled by alpha / rank (diffusers: alpha = "
                                               "rank, scale 1)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                            "tooltip": "AdamW learning rate (diffusers DreamBooth-LoRA README: 1e-4)."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000,
                                  "tooltip": "Optimizer steps (diffusers DreamBooth-LoRA README: 500)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Instance examples per step; as many class examples join each step "
                                                  "(diffusers README: 1)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                       "tooltip": "Training resolution (512 for SD1.5, 1024 for SDXL)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFF,
                                 "tooltip": "Seed of the LoRA init, the class images, the example order, noise and "
                                            "timesteps: the same seed gives the same LoRA."}),
                "save_name": ("STRING", {"default": "dreambooth_sks_dog",
                                         "tooltip": "File name under models/loras (.safetensors added; sub/folders "
                                                    "allowed, '..' not). Also names the resume checkpoint."}),
            },
            "optional": {
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name. Off: "
                                                                       "an existing name is an error."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from save_name's last checkpoint "
                                                                   "(.resume file) when a run was interrupted."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000,
                                             "tooltip": "Write a resume checkpoint every N steps (0 = never)."}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train a LoRA on the text "
                                                                                "encoder's attention and MLP layers."}),
                "text_encoder_lr": ("FLOAT", {"default": 5e-6, "min": 1e-8, "max": 1.0, "step": 1e-6, "round": False,
                                              "tooltip": "Learning rate of the text-encoder LoRA (diffusers SDXL "
                                                         "script: 5e-6)."}),
                "targets": (list(dreambooth.lora.UNET_TARGETS), {
                    "default": "attention",
                    "tooltip": "UNet layers with LoRA. attention: to_q/k/v/out (diffusers' DreamBooth-LoRA). "
                               "transformer: every linear / 1x1 conv in the transformer blocks (kohya)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute activations in "
                                                                                    "backward: less memory, slower."}),
                "training_dtype": (list(dreambooth.TRAINING_DTYPES), {
                    "default": "auto", "tooltip": "Compute precision (LoRA weights stay fp32). auto: fp32 on CPU, "
                                                  "bf16 (or fp16 with loss scaling) autocast on GPU."}),
                "class_steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                        "tooltip": "Sampling steps per class image (diffusers pipeline default 50)."}),
                "class_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1,
                                        "tooltip": "CFG of the class images (diffusers pipeline default 7.5)."}),
                "class_sampler": (_samplers(), {"default": "euler_ancestral",
                                                "tooltip": "Sampler of the class images (the paper samples the "
                                                           "frozen model with an ancestral sampler)."}),
                "loss_weighting": (list(dreambooth.LOSS_WEIGHTINGS), {
                    "default": "none",
                    "tooltip": "Weight of each noise level in the loss. none: all alike (diffusers, kohya default). "
                               "min_snr_5: Min-SNR-5, less weight on the low-noise steps. debiased: kohya's debiased "
                               "estimation, more weight on the high-noise steps, where layout and colours are "
                               "decided."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = ("The model with the trained LoRA applied (strength 1).",
                       "The CLIP with the trained LoRA applied (changed only with train_text_encoder).",
                       "The saved file's name in models/loras, for LoraLoader.",
                       "Instance and prior loss per step.")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    def train(self, model, clip, vae, instance_images, class_noun="dog", instance_prompt="a photo of sks {class}",
              class_prompt="a photo of {class}", num_class_images=100, prior_loss_weight=1.0, rank=4, alpha=4.0,
              learning_rate=1e-4, steps=500, batch_size=1, resolution=512, seed=0, save_name="dreambooth_sks_dog",
              overwrite=False, resume=True, checkpoint_every=100, train_text_encoder=False, text_encoder_lr=5e-6,
              targets="attention", gradient_checkpointing=False, training_dtype="auto", class_steps=50,
              class_cfg=7.5, class_sampler="euler_ancestral", loss_weighting="none"):
        import comfy.model_management
        import comfy.sd

        require(isinstance(class_noun, str), "class_noun", "a word such as dog", repr(class_noun))
        if "{class}" in instance_prompt + class_prompt:
            require(class_noun.strip() != "", "class_noun", "a class noun to fill {class} in the prompts", "empty")
        cfg = dreambooth.TrainConfig(
            instance_prompt=dreambooth.fill_class(instance_prompt, class_noun),
            class_prompt=dreambooth.fill_class(class_prompt, class_noun), num_class_images=int(num_class_images),
            prior_loss_weight=float(prior_loss_weight), rank=int(rank), alpha=float(alpha),
            learning_rate=float(learning_rate), text_encoder_lr=float(text_encoder_lr), steps=int(steps),
            batch_size=int(batch_size), resolution=int(resolution), seed=int(seed),
            train_text_encoder=bool(train_text_encoder), targets=targets,
            gradient_checkpointing=bool(gradient_checkpointing), training_dtype=training_dtype,
            checkpoint_every=int(checkpoint_every), class_steps=int(class_steps), class_cfg=float(class_cfg),
            class_sampler=class_sampler, loss_weighting=loss_weighting)
        dreambooth.validate_config(cfg)
        name = dreambooth.sanitize_save_name(save_name)
        path = dreambooth.save_path_for(_loras_dir(), name, bool(overwrite))
        result = dreambooth.train(model, clip, vae, instance_images, cfg, path, _class_cache_dir(),
                                overwrite=bool(overwrite), resume=bool(resume),
                                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, result.lora_sd, 1.0, 1.0)
        return (new_model, new_clip, name + ".safetensors", dreambooth.loss_curve_image(result.losses))


def _samplers() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


NODE_CLASS_MAPPINGS = {"PersonalizeDreamBoothLoRATrainer": DreamBoothLoRATrainer}
NODE_DISPLAY_NAME_MAPPINGS = {"PersonalizeDreamBoothLoRATrainer": "DreamBooth LoRA Trainer (prior preservation)"}
