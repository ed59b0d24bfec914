"""Shared machinery of the Personalize pack, written once and used by every technique's node file.

- ``errors``              clear input errors that name the input and what was expected
- ``validation``          the one validation layer: every node's inputs checked against its INPUT_TYPES at entry
- ``paths``               model folders registered with ComfyUI's ``folder_paths``
- ``introspect``          model family (SD1.5 / SD2 / SDXL), attention block keys, token grids
- ``weights_io``          safetensors I/O: atomic writes, key checks
- ``images``              reference preparation (subject on white, crop, pad square), latent fitting
- ``attention``           patch-object base, attention kernels, attn1 feature collector
- ``reference_attention`` Reference Self-Attention engine (BootPIG); ``bootpig_weights`` its weights format
- ``pick_and_draw``       training-free latent guidance engine of Pick-and-Draw
- ``lora``, ``dreambooth``  LoRA modules in kohya format and the DreamBooth training loop
- ``trainable``           helpers for training inside ComfyUI (out-of-place CLIP layers)
- ``location``, ``adapters``, ``text_fusion``, ``sam``, ``subject_training``  Subject-Diffusion: location channel and
                          conv_in expansion, gated adapters and MLPs, image-into-text fusion, SAM masks, its trainer
"""
