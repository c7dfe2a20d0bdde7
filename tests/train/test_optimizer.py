"""`training.optim: auto`: torch's fused AdamW where it has the kernel — the same update as the per-tensor loop."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config_dict
from wronai.config import load_config
from wronai.recipe import Pipeline


def built_optimizer(model_dir, data, out, **training) -> torch.optim.Optimizer:
    raw = make_config_dict(model_dir, data, out, training=training)
    pipeline = Pipeline(load_config(data=raw))
    # the run saves the optimizer it took (a resumed run keeps it: train.resume.keep_decided)
    assert pipeline.config.training.optim == training.get("optim", "adamw_torch_fused")
    trainer = pipeline.build_trainer()
    trainer.create_optimizer()
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper, if any


@pytest.mark.parametrize(("training", "fused"), [({}, True), ({"optim": "adamw_torch"}, False)])
def test_the_default_optimizer_is_fused_adamw_on_cpu(tiny_model_dir, alpaca_file, tmp_path, training, fused):
    """The default (no `optim` written) builds torch's fused AdamW on a CPU; a written `adamw_torch` is kept."""
    optimizer = built_optimizer(tiny_model_dir, alpaca_file, tmp_path / "out", **training)
    assert type(optimizer) is torch.optim.AdamW
    assert bool(optimizer.defaults.get("fused")) is fused


def test_fused_adamw_makes_the_per_tensor_update():
    """What auto changes is the kernel, not the update: ten steps of both on the same gradients agree to
    float32 rounding (LoRA-shaped parameters, weight decay and the Trainer's betas and epsilon)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 48), (96, 16), (16, 96), (48, 16)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(10)]
    finals = []
    for kind in ({"foreach": False}, {"fused": True}):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **kind)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    for first, loop, fused in zip(start, *finals, strict=True):
        assert (loop - first).abs().max() > 0.05  # ten steps of lr 1e-2 moved every parameter
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
