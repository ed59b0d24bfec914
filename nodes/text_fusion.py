"""Subject-Diffusion's text fusion (arXiv 2307.11410 §3.2; official ``make_prompt``): the prompt gets
', the {label} is sks' per subject and the placeholder token is replaced, before the text encoder, by an embedding
(the reference's CLIP-vision embedding through the trained MLP). Used by the Subject Image Prompt node and by the
trainer."""
from __future__ import annotations

from .errors import InputError, require

PLACEHOLDER = "sks"


def make_prompt(caption: str, labels, placeholder: str = PLACEHOLDER) -> str:
    """'{caption}, the {label} is sks' per subject (official ``make_prompt``)."""
    return caption.strip() + "".join(f", the {lab.strip()} is {placeholder}" for lab in labels)


# ---------------------------------------------------------------------------------------------- text fusion
def text_key(clip, input_name: str = "clip") -> str:
    keys = list(clip.tokenize("a").keys())
    if len(keys) != 1:
        raise InputError(input_name, "a single text encoder CLIP (SD1.5 or SD2.x; Subject-Diffusion's backbone is "
                         "SD2-base)", f"a CLIP with {len(keys)} encoders ({', '.join(keys)})")
    return keys[0]


def placeholder_id(clip, key: str, placeholder: str = PLACEHOLDER) -> int:
    """Token id of the placeholder (CLIP BPE: 'sks' = 48136): the one token that 'a sks' has more than 'a' (works
    whatever the tokenizer's start / end / pad tokens are)."""
    a = [int(t[0]) for t in clip.tokenize("a")[key][0]]
    b = [int(t[0]) for t in clip.tokenize("a " + placeholder)[key][0]]
    i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), None)
    require(i is not None and i + 1 < len(b) and b[i + 1] == a[i], "text",
            f"a placeholder '{placeholder}' that the tokenizer keeps as one token", "several tokens")
    return b[i]


def token_width(clip) -> int:
    """Width of the text encoder's input token embeddings (what the CLS MLP must output)."""
    csm = clip.cond_stage_model
    enc = getattr(csm, getattr(csm, "clip", ""), None)
    require(enc is not None, "clip", "an SD1.5 / SD2.x text encoder", type(csm).__name__)
    return int(enc.transformer.get_input_embeddings().weight.shape[1])


def fuse_tokens(tokens: dict, key: str, ph_id: int, embeds) -> tuple[dict, list[int]]:
    """Replace the placeholder tokens, in order, by the embeddings (ComfyUI inserts tensor tokens as embeddings at
    the first layer, before position embeddings). Returns (tokens, flat positions in the first chunk)."""
    out = {k: [list(chunk) for chunk in v] for k, v in tokens.items()}
    positions = []
    n = 0
    for c, chunk in enumerate(out[key]):
        for j, tok in enumerate(chunk):
            if isinstance(tok[0], int) and tok[0] == ph_id:
                require(n < len(embeds), "text", f"{len(embeds)} placeholder(s) '{PLACEHOLDER}' (one per subject)",
                        "more placeholders than subjects")
                chunk[j] = (embeds[n],) + tuple(tok[1:])
                if c == 0:
                    positions.append(j)
                n += 1
    require(n == len(embeds), "text", f"{len(embeds)} placeholder(s) '{PLACEHOLDER}' (one per subject)", f"{n}")
    return out, positions
