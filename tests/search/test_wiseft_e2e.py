"""WiSE-FT's curve from a real search: ``ingredients.zeroshot`` makes the base CLIP's zero-shot
model, ``interpolate`` between it and a fine-tune reports val, test and the shifted set at
every alpha; alpha = 0 scores as the zero-shot model computed here from open_clip's own model
(prompts encoded, normalized, averaged, normalized, times the logit scale), alpha = 1 as the
fine-tune's individual score and as open_clip scores the fine-tune's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

ARCH = "soupsearch-test-tiny-wiseft"
CLASSES = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]
POINTS = 5


def _zero_shot_weights(clip) -> torch.Tensor:
    tok = open_clip.get_tokenizer(ARCH)
    rows = []
    with torch.no_grad():
        for c in CLASSES:
            f = clip.encode_text(tok([t.format(c) for t in TEMPLATES]))
            f = f / f.norm(dim=-1, keepdim=True)
            m = f.mean(0)
            rows.append(m / m.norm())
    return torch.stack(rows) * clip.logit_scale.exp()


def _metrics(clip, weight, bias, x, y) -> dict:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = clip.encode_image((torch.from_numpy(x) - mean) / std)
        logp = torch.log_softmax((f / f.norm(dim=-1, keepdim=True)) @ weight.T + bias, 1).double()
    yt = torch.from_numpy(y)
    return {"accuracy": int((logp.argmax(1) == yt).sum()) / len(y), "nll": float(-logp[torch.arange(len(y)), yt].mean())}


def test_wise_ft_curve_from_the_zero_shot_base_to_a_fine_tune(tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    from tests.helpers import fresh_mlflow_uri, tiny_clip_arch

    with tiny_clip_arch(ARCH):
        torch.manual_seed(0)
        clip = open_clip.create_model(ARCH, pretrained=None).eval()
        with torch.no_grad():
            clip.logit_scale.fill_(3.0)
        torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")  # the whole CLIP (base)
        zs = _zero_shot_weights(clip)
        ft = open_clip.create_model(ARCH, pretrained=None).eval()  # the fine-tune: moved weights, its own head
        ft.load_state_dict(clip.state_dict())
        with torch.no_grad():
            for p in ft.visual.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ft_w, ft_b = zs + torch.randn_like(zs) * 2.0, torch.randn(len(CLASSES)) * 0.5
        (tmp_path / "sweep").mkdir()
        torch.save({**{f"model.{k}": v for k, v in ft.state_dict().items() if not k.startswith("transformer.")},
                    "classification_head.weight": ft_w, "classification_head.bias": ft_b},
                   tmp_path / "sweep" / "ft_0.pt")  # model soups' layout
        rng = np.random.default_rng(0)
        data = {}
        for split in ("val", "test", "shifted"):
            x = rng.random((48, 3, 32, 32), dtype=np.float32)
            y = rng.integers(0, len(CLASSES), 48).astype(np.int64)
            np.savez(tmp_path / f"{split}.npz", x=x, y=y)
            data[split] = (x, y)
        cfg = config_from_dict({
            "name": "wiseft", "run_dir": str(tmp_path / "run"),
            "model": {"factory": f"open_clip:{ARCH}", "kwargs": {"num_classes": len(CLASSES)}},
            "ingredients": {"path": str(tmp_path / "sweep"), "base": str(tmp_path / "open_clip_pytorch_model.bin"),
                            "zeroshot": {"classnames": CLASSES, "templates": TEMPLATES}},
            "data": {"val": {"type": "npz", "path": str(tmp_path / "val.npz")},
                     "test": {"type": "npz", "path": str(tmp_path / "test.npz")},
                     "shifts": [{"name": "shifted", "type": "npz", "path": str(tmp_path / "shifted.npz")}],
                     "corruptions": None,
                     "normalize": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}},
            "eval": {"backend": "local", "shard_size": 16},
            "search": {"strategies": [{"name": "interpolate", "pairs": [["base", "ft_0"]], "points": POINTS}]},
            "tracking": {"tracking_uri": fresh_mlflow_uri(tmp_path), "experiment": "wiseft",
                         "log_soup_weights": False, "log_best_model": False},
        })
        out = run_search(cfg)

    curve = json.loads((tmp_path / "run" / "soups" / "interpolate" / "interpolation.json").read_text())["curves"]
    c = curve["base-ft_0"]
    assert c["alpha"] == pytest.approx(np.linspace(0, 1, POINTS).tolist())
    assert len(c["metrics"]) == POINTS
    for m in c["metrics"]:  # every alpha: val, test and the shifted set (and their mean over shifts)
        assert {"val", "test", "shifted", "ood_mean"} <= set(m), sorted(m)
    zero_shot = {s: _metrics(clip, zs, torch.zeros(len(CLASSES)), *data[s]) for s in data}
    fine_tune = {s: _metrics(ft, ft_w, ft_b, *data[s]) for s in data}
    [row] = out.ingredients
    for s in data:
        assert c["metrics"][0][s]["accuracy"] == pytest.approx(zero_shot[s]["accuracy"], abs=1e-9), s
        assert c["metrics"][0][s]["nll"] == pytest.approx(zero_shot[s]["nll"], abs=1e-4), s
        assert c["metrics"][-1][s]["accuracy"] == pytest.approx(row.metrics[s]["accuracy"], abs=1e-9), s
        assert c["metrics"][-1][s]["nll"] == pytest.approx(row.metrics[s]["nll"], abs=1e-6), s
        assert c["metrics"][-1][s]["accuracy"] == pytest.approx(fine_tune[s]["accuracy"], abs=1e-9), s
        assert c["metrics"][-1][s]["nll"] == pytest.approx(fine_tune[s]["nll"], abs=1e-4), s
    # the two ends differ, so the curve is not one model scored five times
    assert any(abs(zero_shot[s]["nll"] - fine_tune[s]["nll"]) > 1e-2 for s in data)
