"""CLIP zero-shot heads (``ingredients.zeroshot``): the classifier CLIP's zero-shot evaluation
uses, built from class names and prompt templates through the text tower of the base.

The head is open_clip's own ``build_zero_shot_classifier`` (each class: its prompts
encoded, normalized, averaged, normalized again) scaled by the model's ``logit_scale``, as
model soups and WiSE-FT build their zero-shot models; it becomes the base's
``classification_head`` (bias 0), so the base *is* the zero-shot model: the start of
WiSE-FT's interpolation curve (``interpolate`` with the base) and of task vectors. The base
checkpoint must hold the text tower (an open_clip checkpoint, or model soups' wrapper of one).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.errors import CheckpointError, ConfigError


class ZeroShotSpec(BaseModel):
    """Class names and prompt templates (lists, or files with one per line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    classnames: list[str] | str  # in the order of the model's class indices
    templates: list[str] | str = Field(default_factory=lambda: ["a photo of a {}."])  # each with one {}
    built_from: str | None = None  # set by the search: the base checkpoint the zero-shot model was built from


def _lines(v, what: str) -> list[str]:
    if isinstance(v, list):
        items = v
    else:
        p = Path(v)
        try:
            items = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise ConfigError(f"ingredients.zeroshot.{what}: cannot read {p} ({e.strerror or e})") from None
    if not items:
        raise ConfigError(f"ingredients.zeroshot.{what}: empty, expected at least one")
    return items


def zeroshot_head(arch: str, base: str | Path, classnames: list[str], templates: list[str], rename=()) -> dict:
    """``{"classification_head.weight" [C, d], "classification_head.bias" [C]}`` from the text
    tower of the CLIP checkpoint ``base`` (its names through ``ingredients.rename``'s rules)."""
    import open_clip
    import torch

    from soupsearch.ingredients.discovery import aligned_to, load_state_dict

    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(f"ingredients.zeroshot.templates: {t!r} has {t.count('{}')} '{{}}', expected one "
                              "(where the class name goes)")
    clip = open_clip.create_model(arch, pretrained=None).eval()
    want = clip.state_dict()
    sd = aligned_to(load_state_dict(base), want.keys(), rename, f"base {base}")
    missing = [k for k in want if k not in sd]
    if missing:
        raise CheckpointError(f"base {base}: tensor {missing[0]!r} of the CLIP model is missing ({len(missing)} in "
                              "all); a zero-shot head needs the text tower (an open_clip checkpoint of the whole model)")
    clip.load_state_dict({k: sd[k] for k in want})
    with torch.no_grad():
        w = open_clip.build_zero_shot_classifier(clip, tokenizer=open_clip.get_tokenizer(arch), classnames=classnames,
                                                 templates=templates, device="cpu", use_tqdm=False)  # [d, C]
        weight = (w.T * clip.logit_scale.exp()).contiguous()
    return {"classification_head.weight": weight, "classification_head.bias": torch.zeros(len(classnames))}


def prepare(cfg, run_dir: Path, say=print):
    """The config with ``ingredients.base`` replaced by the zero-shot model written under the
    run dir (the base's image tower + the zero-shot head); unchanged without ``zeroshot``."""
    zs = cfg.ingredients.zeroshot
    if zs is None:
        return cfg
    if not cfg.model.factory.startswith("open_clip:") or not cfg.ingredients.base:
        raise ConfigError("ingredients.zeroshot needs model.factory open_clip:<arch> and ingredients.base (the CLIP "
                          "checkpoint whose text tower encodes the class names)")
    import torch

    from soupsearch.ingredients.discovery import aligned_to, load_state_dict
    from soupsearch.models.factory import create_model
    from soupsearch.util.fileio import save_safetensors_atomic

    source = zs.built_from or cfg.ingredients.base
    classnames, templates = _lines(zs.classnames, "classnames"), _lines(zs.templates, "templates")
    kwargs = dict(cfg.model.kwargs)
    if kwargs.get("num_classes") not in (None, len(classnames)):
        raise ConfigError(f"ingredients.zeroshot.classnames: {len(classnames)} names, but model.kwargs.num_classes is "
                          f"{kwargs['num_classes']}")
    rename = cfg.ingredients.rename
    head = zeroshot_head(cfg.model.factory.split(":", 1)[1], source, classnames, templates, rename)
    skeleton = create_model(cfg.model.factory, **{**kwargs, "num_classes": len(classnames)}).state_dict()
    sd = aligned_to(load_state_dict(source), [k for k in skeleton if not k.startswith("classification_head.")],
                    rename, f"base {source}")
    out = {k: (head[k] if k in head else sd[k]).detach().to(torch.float32 if v.is_floating_point() else v.dtype)
           .contiguous() for k, v in skeleton.items()}
    path = Path(run_dir) / "zeroshot" / "base.safetensors"
    save_safetensors_atomic(out, path, metadata={"soupsearch.zeroshot_from": str(source),
                                                 "soupsearch.classes": str(len(classnames))})
    say(f"zero-shot base: {len(classnames)} classes x {len(templates)} templates through the text tower of {source} "
        f"-> {path}")
    ing = cfg.ingredients.model_copy(update={"base": str(path), "zeroshot": zs.model_copy(update={"built_from": source})})
    return cfg.model_copy(update={"ingredients": ing})
