"""The last decoder layer's position-wise parts computed only at trained positions.

After the last decoder layer only position-wise work is left (the final norm, the head, the loss), so an output
of that layer at a position whose next token is not trained (a prompt token, with answer-only masking) never
reaches the loss. Three of the layer's parts act on each position alone and feed only that position's
output: the query projection (a query is used only for its own position's attention row), the attention
output projection and the MLP. ``trained_rows_only`` computes them on the trained positions' rows only —
a forward pre-hook hands each module those rows, a forward hook puts its output back in place, zeros
elsewhere — so the untrained positions of the last layer skip ~90% of its matmuls, forward and backward.
The keys and values stay whole: trained queries attend to every earlier position. The loss and every
gradient are the stock ones (to float rounding of the smaller matmuls); only the last layer's outputs at
untrained positions, which nothing reads, differ.

Measured on the speed benchmark's 6-layer model (2-core AMD EPYC, fp32 with AVX2 emulated, 61% of the
positions trained): a forward + backward 3.5–4% faster, the same batches alternating in one process
(``docs/benchmarks.md``). It is worth about ``(1 - trained share) / layers`` of a step on other models.

Under bf16 autocast on a CPU it does not pay: each new number of rows is a new oneDNN matmul kernel kept in
memory (80 steps of the benchmark: +175 MB of peak RSS, 32.6 against 30.7 s), so ``auto`` leaves it out
there (``DevicePlan.last_layer_trained_only``).

``hardware.last_layer_trained_only`` turns it on (auto = fp32 CPU runs); the trainer uses it with
``training.trained_logits_only``, never where the last layer is recomputed by gradient checkpointing (its
recomputation would run without the hooks), and only after ``last_layer_problem`` found the model's loss
and gradients unchanged by it on the first batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from wronai.errors import WronAIError
from wronai.model.kbit import gradient_checkpointing_on

# the last decoder layer's parts computed on trained rows: attribute paths inside the layer
POSITION_WISE_PARTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp")


def decoder_layers(model: Any) -> torch.nn.ModuleList | None:
    """The decoder layers of a (possibly PEFT- or DDP-wrapped) causal LM: its ``ModuleList`` named
    ``layers`` (Llama, Mistral, Qwen, Gemma, Phi-3, …) with one entry per ``config.num_hidden_layers``."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    count = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for name, module in base.named_modules():
        listed = name.rsplit(".", 1)[-1] == "layers" and isinstance(module, torch.nn.ModuleList)
        if listed and (count is None or len(module) == count):
            return module
    return None


def last_layer_parts(model: Any) -> tuple[list[torch.nn.Module], str | None]:
    """The last decoder layer's position-wise modules (``POSITION_WISE_PARTS`` it has), or why there are none."""
    layers = decoder_layers(model)
    if layers is None or len(layers) == 0:
        return [], "the model has no `layers` list of decoder layers"
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "output_router_logits", False):
        return [], "the router loss of a mixture-of-experts model counts every position of its last layer"
    last = layers[-1]
    # transformers 5 marks each checkpointed layer (every_n_layers may skip the last); 4.x only the model
    if getattr(last, "gradient_checkpointing", False) or (
        not hasattr(last, "gradient_checkpointing") and gradient_checkpointing_on(model)
    ):
        return [], "the last decoder layer is recomputed by gradient checkpointing"
    parts = [last.get_submodule(path) for path in POSITION_WISE_PARTS if _has(last, path)]
    if not parts:
        return (
            [],
            f"its last decoder layer ({type(last).__name__}) has none of {', '.join(POSITION_WISE_PARTS)}",
        )
    return parts, None


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), torch.nn.Module)
    except AttributeError:
        return False


def _select(mask: torch.Tensor, module: Any, args: tuple[Any, ...]) -> Any:
    """Pre-hook: the module's input rows at trained positions, as one row of ``mask.sum()`` positions."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[:-1] != mask.shape:
        raise WronAIError(
            f"{type(module).__name__} of the last decoder layer was not called on one hidden state per "
            "position — set hardware.last_layer_trained_only=off"
        )
    hidden = args[0]
    return (hidden[mask.to(hidden.device)].unsqueeze(0), *args[1:])


def _place(mask: torch.Tensor, module: Any, args: Any, output: Any) -> Any:
    """Forward hook: the output rows back at their positions, zeros at the untrained ones."""
    if not isinstance(output, torch.Tensor):
        raise WronAIError(
            f"{type(module).__name__} of the last decoder layer does not return one tensor — set "
            "hardware.last_layer_trained_only=off"
        )
    full = output.new_zeros(*mask.shape, output.shape[-1])
    full[mask.to(output.device)] = output[0]
    return full


@contextlib.contextmanager
def trained_rows_only(parts: Sequence[torch.nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """While entered, each of ``parts`` computes only the rows where ``mask`` (batch × positions) is True."""
    handles = []
    try:
        for part in parts:
            handles.append(part.register_forward_pre_hook(partial(_select, mask)))
            handles.append(part.register_forward_hook(partial(_place, mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_layer_problem(model: Any, inputs: dict[str, Any], parts: Sequence[torch.nn.Module]) -> str | None:
    """The loss with the last layer on trained rows against the stock one, on the model itself under the
    caller's autocast: the first ``CHECK_POSITIONS`` tokens of the batch's first row (the fused loss's check
    length), the first half of them untrained (no bucketing: the check is of positions, not of shapes), run
    twice from the same random state; the loss and the gradient of every trained parameter must agree. None
    when they do, else what differs (a model whose last layer mixes positions after these parts fails
    here). Parameters' ``.grad`` are not touched."""
    from wronai.train.loss import CHECK_POSITIONS, first_difference, runs_from_one_state

    ids = inputs["input_ids"][:1, :CHECK_POSITIONS]
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        results, _ = runs_from_one_state(
            model, {"input_ids": ids, "labels": labels}, [{"last_layer": ()}, {"last_layer": parts}],
            lambda _hidden: params,
        )  # fmt: skip
    except WronAIError as err:
        return str(err).split(" — ")[0]
    half = torch.is_autocast_enabled(ids.device.type) or any(p.dtype != torch.float32 for p in params)
    names = ["loss", *("the gradient of a trained parameter" for _ in params)]
    return first_difference(names, results, 3e-2 if half else 1e-4, "the stock forward's")
