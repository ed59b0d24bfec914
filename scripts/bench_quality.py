"""Toy DreamBench: subject fidelity / prompt fidelity / seconds per image for each personalization method of the pack,
on the toy world's trained model, with fixed seeds. Offline, CPU is enough.

    .venv/bin/python scripts/bench_quality.py            # 12 subjects x 10 prompts x 2 seeds
    .venv/bin/python scripts/bench_quality.py --quick    # 4 subjects x 10 prompts x 1 seed
    .venv/bin/python scripts/bench_quality.py --save-grid out.png   # also a grid of generations to look at
    .venv/bin/python scripts/bench_quality.py --weights DIR   # another toy model folder (unet, vae, scorers)
    .venv/bin/python scripts/bench_quality.py --denoise 1,0.6,0.3   # also img2img from the subject's renders

Rows:
- real renders (ceiling): the subject drawn by the renderer as each prompt asks (like DreamBench's real-image row);
- real renders, other subject of the same class: the subject-fidelity level of a right-class wrong-instance image;
- no personalization (class prompt): the floor, 'a photo of a ball on the beach';
- no personalization (token prompt): 'a photo of a sks ball on the beach' on the untouched model;
- BootPIG reference attention: PersonalizeBootPIGReferenceEncoder (the base model as reference UNet, references with
  their masks) + PersonalizeBootPIGRSAPatch with the paper's defaults, class prompt;
- BootPIG reference attention, reference on uncond: the same with the RSA Patch's reference_on_uncond (the negative
  rows read the reference too, so CFG does not multiply the reference's pull);
- further methods of the pack join when their nodes exist and need no extra training data (see METHODS).

Subject fidelity = mean cosine similarity of the instance embedder between each image and the subject's reference
renders (DreamBench's DINO protocol); prompt fidelity = mean of the class and background classifiers' accuracy
against the prompt (stands for CLIP-T). Scorers: toyworld/scorers.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts import host  # noqa: E402

host.bootstrap()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import personalize  # noqa: E402,F401  (the pack, through the import root: registers its nodes)
from personalize.toyworld import model as tw_model  # noqa: E402
from personalize.toyworld import scenes  # noqa: E402
from personalize.toyworld.scorers import Scorers  # noqa: E402

STEPS, CFG, SAMPLER, SCHEDULER = 20, 5.0, "euler", "normal"
SIZE = tw_model.IMAGE_SIZE   # image size (px) of the toy model under test: set by main() from its weights


def generate(model, clip, vae, prompt, seed, n, init=None, denoise=1.0):
    return tw_model.generate(model, clip, vae, prompt, seed, n, SIZE, STEPS, CFG, SAMPLER, SCHEDULER, init, denoise)


class Method:
    name = ""
    uses_token = False

    def prepare(self, model, clip, vae, subject, refs):
        """Once per subject: (model, clip) to generate with."""
        return model, clip

    def per_prompt(self, model, clip, prompt, subject):
        """Once per prompt (prompt-dependent patches)."""
        return model

    def available(self):
        return True


def _node(node_id):
    return personalize.NODE_CLASS_MAPPINGS[node_id]()


def _refs_tensors(refs):
    return torch.from_numpy(np.stack([r[0] for r in refs])), torch.from_numpy(np.stack([r[1] for r in refs]))


class NoPersonalization(Method):
    name = "no personalization (class prompt)"


class TokenOnly(Method):
    name = "no personalization (token prompt)"
    uses_token = True


class BootPIGReferenceAttention(Method):
    name = "BootPIG reference attention (no BootPIG training)"
    on_uncond = False

    def available(self):
        return "PersonalizeBootPIGRSAPatch" in personalize.NODE_CLASS_MAPPINGS

    def prepare(self, model, clip, vae, subject, refs):
        imgs, masks = _refs_tensors(refs)
        ref = _node("PersonalizeBootPIGReferenceEncoder").encode(model, vae, imgs, mask=masks,
                                                                 resolution=SIZE, seed=0)[0]
        return _node("PersonalizeBootPIGRSAPatch").patch(model, ref, reference_on_uncond=self.on_uncond)[0], clip


class BootPIGReferenceOnUncond(BootPIGReferenceAttention):
    """The same with the RSA Patch's reference_on_uncond: the negative rows read the reference too (issue #14)."""
    name = "BootPIG reference attention, reference on uncond (no BootPIG training)"
    on_uncond = True


class PickAndDraw(Method):
    """Appearance Picking Guidance with the first reference and its mask (node defaults = the paper's values)."""
    name = "Pick-and-Draw appearance guidance"

    def available(self):
        return "PersonalizeAppearancePickingGuidance" in personalize.NODE_CLASS_MAPPINGS

    def prepare(self, model, clip, vae, subject, refs):
        imgs, masks = _refs_tensors(refs[:1])
        self.ref = _node("PersonalizePickAndDrawReference").encode(model, vae, imgs, mask=masks,
                                                                   resolution=SIZE)[0]
        return model, clip

    def per_prompt(self, model, clip, prompt, subject):
        return _node("PersonalizeAppearancePickingGuidance").patch(model, self.ref, clip, prompt, subject.cls)[0]


class BootPIGPickAndDraw(PickAndDraw):
    name = "BootPIG reference attention + Pick-and-Draw"

    def available(self):
        return PickAndDraw().available() and BootPIGReferenceAttention().available()

    def prepare(self, model, clip, vae, subject, refs):
        base, _ = PickAndDraw.prepare(self, model, clip, vae, subject, refs)
        return BootPIGReferenceAttention().prepare(base, clip, vae, subject, refs)


class DreamBoothLoRA(Method):
    """DreamBooth LoRA (prior preservation) trained on the 4 references per subject: 'a photo of a sks <class>'."""
    uses_token = True
    # the toy recipe (docs/quality.md, session 9): tuned on ball_00 / teddy_04 / star_08 of the 128 px model; not the
    # trainer node's defaults (lr 1e-4, no weighting: a real SD checkpoint's). The debiased weighting (high noise up)
    # is what carries the subject's body colour, decided in the first sampling steps: 0.175 -> 0.435 at lr 1e-3
    steps = 600
    lr = 2e-3
    rank = 8
    targets = "attention"
    prior_weight = 1.0
    te_lr = 0.0   # > 0: also train a LoRA on the text encoder at this learning rate
    class_images = 8
    loss_weighting = "debiased"
    reuse = False  # True: load a subject's LoRA that an earlier run saved with this recipe instead of training

    @property
    def name(self):
        te = f", text encoder lr {self.te_lr:g}" if self.te_lr else ""
        reused = "; reused LoRA files: s / image without training" if self.reuse else ""
        return (f"DreamBooth LoRA ({self.steps} steps, lr {self.lr:g}, rank {self.rank}, {self.targets}, "
                f"prior {self.prior_weight:g} x {self.class_images} images, loss weighting {self.loss_weighting}{te}"
                f"{reused})")

    def available(self):
        return "PersonalizeDreamBoothLoRATrainer" in personalize.NODE_CLASS_MAPPINGS

    def recipe(self) -> dict:
        """The trainer node's arguments of this recipe (also what its file's ``personalize.config`` records)."""
        return {"steps": self.steps, "learning_rate": self.lr, "rank": self.rank, "alpha": float(self.rank),
                "targets": self.targets, "prior_loss_weight": self.prior_weight,
                "num_class_images": self.class_images, "loss_weighting": self.loss_weighting,
                "train_text_encoder": self.te_lr > 0, "text_encoder_lr": self.te_lr or 5e-6, "resolution": SIZE,
                "seed": 0, "class_steps": STEPS, "class_cfg": CFG, "class_sampler": SAMPLER}

    def saved(self, subject):
        """The LoRA file an earlier run of this recipe saved for the subject (models/loras), else None."""
        import json

        import folder_paths
        from safetensors import safe_open

        path = folder_paths.get_full_path("loras", f"toybench_{subject.name}.safetensors")
        if not path:
            return None
        with safe_open(path, "pt") as f:
            cfg = json.loads((f.metadata() or {}).get("personalize.config", "{}"))
        return path if all(cfg.get(k) == v for k, v in self.recipe().items()) else None

    def prepare(self, model, clip, vae, subject, refs):
        if self.reuse:
            import nodes as comfy_nodes

            if self.saved(subject) is None:
                raise SystemExit(f"--dreambooth-reuse: no toybench_{subject.name}.safetensors of this recipe in "
                                 "models/loras (run the bench once without it)")
            return comfy_nodes.LoraLoader().load_lora(model, clip, f"toybench_{subject.name}.safetensors", 1.0, 1.0)
        imgs, _ = _refs_tensors(refs)
        with torch.inference_mode(False):
            out = _node("PersonalizeDreamBoothLoRATrainer").train(
                model, clip, vae, imgs, class_noun=subject.cls, instance_prompt="a photo of a sks {class}",
                class_prompt="a photo of a {class}", save_name=f"toybench_{subject.name}", overwrite=True,
                resume=False, checkpoint_every=0, **self.recipe())
        return out[0], out[1]


METHODS = [NoPersonalization(), TokenOnly(), BootPIGReferenceAttention(), BootPIGReferenceOnUncond(), PickAndDraw(),
           BootPIGPickAndDraw(), DreamBoothLoRA()]


def real_renders(subject, prompts, seeds):
    """The subject drawn as each prompt asks: the ceiling."""
    assert prompts == scenes.dreambench_prompts(subject)
    return torch.from_numpy(scenes.prompt_renders(subject, seeds, SIZE))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 subjects x 10 prompts x 1 seed")
    ap.add_argument("--subjects", type=int, default=None, help="this many subjects, spread over the 12")
    ap.add_argument("--only", default=None, help="comma-separated subject names (e.g. ball_00,cube_01), instead")
    ap.add_argument("--seeds", type=int, default=None, help="images per prompt")
    ap.add_argument("--save-grid", default=None, help="write a PNG grid (one row per method, first subject)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=None, help="comma-separated substrings of method names to run (default all)")
    ap.add_argument("--dreambooth-steps", type=int, default=DreamBoothLoRA.steps)
    ap.add_argument("--dreambooth-lr", type=float, default=DreamBoothLoRA.lr)
    ap.add_argument("--dreambooth-rank", type=int, default=DreamBoothLoRA.rank)
    ap.add_argument("--dreambooth-targets", default=DreamBoothLoRA.targets, help="attention | transformer")
    ap.add_argument("--dreambooth-prior-weight", type=float, default=DreamBoothLoRA.prior_weight)
    ap.add_argument("--dreambooth-class-images", type=int, default=DreamBoothLoRA.class_images)
    ap.add_argument("--dreambooth-loss-weighting", default=DreamBoothLoRA.loss_weighting,
                    help="none | min_snr_5 | debiased")
    ap.add_argument("--dreambooth-text-encoder-lr", type=float, default=DreamBoothLoRA.te_lr,
                    help="> 0: DreamBooth also trains a text-encoder LoRA at this learning rate")
    ap.add_argument("--dreambooth-reuse", action="store_true",
                    help="load each subject's LoRA that an earlier run of the same recipe saved (models/loras/"
                         "toybench_<subject>.safetensors) instead of training it again (its s / image then leaves "
                         "out the training)")
    ap.add_argument("--denoise", default="1",
                    help="comma-separated denoise levels: below 1 a method's images start from the subject's own "
                         "renders (the ceiling row's images) noised to that level (img2img), one row per level: where "
                         "a method loses the subject along the noise schedule")
    ap.add_argument("--weights", default=tw_model.WEIGHTS_DIR,
                    help="the toy model's folder (unet, vae, scorers .safetensors), e.g. a training run's --out; "
                         "its image size comes from the UNet's recipe")
    a = ap.parse_args(argv)
    global SIZE
    SIZE = tw_model.image_size(a.weights)
    torch.set_num_threads(a.threads)
    n_subj = a.subjects or (4 if a.quick else len(scenes.SUBJECTS))
    seeds = a.seeds or (1 if a.quick else 2)
    subjects = [scenes.SUBJECTS[i * len(scenes.SUBJECTS) // n_subj] for i in range(n_subj)]
    if a.only:
        names = {s.name: s for s in scenes.SUBJECTS}
        unknown = [n for n in a.only.split(",") if n.strip() not in names]
        if unknown:
            raise SystemExit(f"--only: unknown subject(s) {unknown}; the subjects are {sorted(names)}")
        subjects = [names[n.strip()] for n in a.only.split(",")]
        n_subj = len(subjects)
    sc = Scorers(str(Path(a.weights) / "scorers.safetensors"))
    model, clip, vae = tw_model.load(a.weights)
    rows, grid = [], []

    def score(name, per_subject_images, secs):
        sf, pc, pb = [], [], []
        for subj, imgs in per_subject_images:
            refs = torch.from_numpy(np.stack([r[0] for r in scenes.subject_references(subj, size=SIZE)]))
            prompts = scenes.dreambench_prompts(subj)
            sf.append(sc.subject_fidelity(imgs, refs))
            pf = sc.prompt_fidelity(imgs, [p["cls"] for p in prompts for _ in range(seeds)],
                                    [p["background"] for p in prompts for _ in range(seeds)])
            pc.append(pf["class"])
            pb.append(pf["background"])
        row = {"method": name, "subject": float(np.mean(sf)), "class": float(np.mean(pc)),
               "background": float(np.mean(pb)), "s_per_image": secs}
        row["prompt"] = (row["class"] + row["background"]) / 2
        rows.append(row)
        print(f"{name:55s} subject {row['subject']:.3f}  prompt {row['prompt']:.3f} (class {row['class']:.2f}, "
              f"background {row['background']:.2f})  {'' if secs is None else f'{secs:.3f} s/img'}\n    per subject: "
              + " ".join(f"{subj.name} {f:.2f}" for (subj, _), f in zip(per_subject_images, sf)), flush=True)

    real = [(s, real_renders(s, scenes.dreambench_prompts(s), seeds)) for s in subjects]
    score("real renders (ceiling)", real, None)
    other = []
    for s in subjects:
        twin = next(t for t in scenes.SUBJECTS if t.cls == s.cls and t != s)
        other.append((s, real_renders(twin, scenes.dreambench_prompts(s), seeds)))
    score("real renders of another subject of the class", other, None)
    grid.append(("real", real[0][1]))
    DreamBoothLoRA.steps, DreamBoothLoRA.lr = a.dreambooth_steps, a.dreambooth_lr
    DreamBoothLoRA.rank = a.dreambooth_rank
    DreamBoothLoRA.targets, DreamBoothLoRA.prior_weight = a.dreambooth_targets, a.dreambooth_prior_weight
    DreamBoothLoRA.te_lr, DreamBoothLoRA.class_images = a.dreambooth_text_encoder_lr, a.dreambooth_class_images
    DreamBoothLoRA.loss_weighting = a.dreambooth_loss_weighting
    DreamBoothLoRA.reuse = a.dreambooth_reuse
    wanted = [w.strip().lower() for w in a.methods.split(",")] if a.methods else None
    levels = sorted((float(d) for d in a.denoise.split(",")), reverse=True)
    if any(not 0 < d <= 1 for d in levels):
        raise SystemExit(f"--denoise: levels in (0, 1] expected, got {a.denoise}")
    for m in METHODS:
        if not m.available() or (wanted and not any(w in m.name.lower() for w in wanted)):
            continue
        t0, n_img, per = time.time(), 0, {d: [] for d in levels}
        for s, (_, init) in zip(subjects, real):
            refs = scenes.subject_references(s, size=SIZE)
            with torch.inference_mode():   # as ComfyUI runs nodes (a trainer turns it off for itself)
                mm, cc = m.prepare(model, clip, vae, s, refs)
            for d in levels:
                imgs = []
                with torch.inference_mode():
                    for k, p in enumerate(scenes.dreambench_prompts(s)):
                        seed = 1000 * scenes.SUBJECTS.index(s) + k
                        prompt = p["prompt"] if m.uses_token else p["class_prompt"]
                        imgs.append(generate(m.per_prompt(mm, cc, prompt, s), cc, vae, prompt, seed, seeds,
                                             None if d >= 1 else init[k * seeds:(k + 1) * seeds], d))
                imgs = torch.cat(imgs)
                n_img += imgs.shape[0]
                per[d].append((s, imgs))
        for d in levels:
            name = m.name if d >= 1 else f"{m.name}, from the subject's renders at denoise {d:g}"
            score(name, per[d], (time.time() - t0) / n_img if len(levels) == 1 else None)
            grid.append((name, per[d][0][1]))
    print()
    print(f"Toy DreamBench: {n_subj} subjects x 10 prompts x {seeds} seed(s), {STEPS} {SAMPLER} steps, cfg {CFG}, "
          f"{SIZE}x{SIZE}, {torch.get_num_threads()} CPU threads, weights {a.weights}")
    print()
    print("| method | subject fidelity (embedder cos) | prompt fidelity | class acc | background acc | s / image |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = "-" if r["s_per_image"] is None else f"{r['s_per_image']:.3f}"
        print(f"| {r['method']} | {r['subject']:.3f} | {r['prompt']:.3f} | {r['class']:.2f} | {r['background']:.2f} "
              f"| {secs} |")
    if a.save_grid:
        from PIL import Image

        g = torch.cat([torch.cat(list(im[:10]), dim=1) for _, im in grid], dim=0)
        Image.fromarray((g.numpy() * 255).astype(np.uint8)).resize((g.shape[1] * 2, g.shape[0] * 2),
                                                                    Image.NEAREST).save(a.save_grid)
        print("grid:", a.save_grid, "rows:", [n for n, _ in grid])
    return rows


if __name__ == "__main__":
    main()
