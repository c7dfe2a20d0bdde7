"""The WronAI pipeline stage by stage from Python, on the offline demo config (no network, CPU is fine).

    python examples/python_api.py                       # 20 steps, output in runs/python-api-demo
    python examples/python_api.py --max-steps 5 --set training.learning_rate=1e-3

This does what ``wronai train`` does (``wronai.recipe.run``), one stage at a time, with the three example
extensions plugged in from Python: the tokenizer hook through the config, the data hook as an argument of
``load_dataset`` and a callback through ``extra_callbacks``. At the end the saved adapter is loaded again
with plain transformers + peft, as anyone receiving the output directory would.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "offline_demo.yaml"))
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/python-api-demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    log = logging.getLogger("python_api")

    from wronai.config.extensions import load_object
    from wronai.recipe import Pipeline
    from wronai.rundir import saving
    from wronai.runtime.hardware import thread_settings

    # 1. Config: the YAML file plus `--set`-style overrides, validated (a ConfigError lists every problem).
    overrides = [
        f"training.max_steps={args.max_steps}",
        f"training.output_dir={args.output_dir}",
        f"training.eval_steps={max(1, args.max_steps // 2)}",
        f"training.save_steps={max(1, args.max_steps // 2)}",
        "training.logging_steps=5",
        "logging.report_to=none",
        f"extensions.tokenizer_hook={HERE / 'custom_tokenization.py'}:add_domain_tokens",
        *args.overrides,
    ]
    trainer = Pipeline(args.config, overrides)
    cfg = trainer.config

    # Process-wide settings (threads, the CPU heap's) hold inside the block and are undone after it.
    with trainer, thread_settings(cfg.hardware):
        # 2. Hardware plan: what this machine will actually use (fp16 -> bf16/fp32 on CPU, paged optimizers -> adamw_torch, ...).
        for line in trainer.plan.describe():
            log.info("plan: %s", line)
        for note in trainer.plan.notes:
            log.info("plan note: %s", note)
        # `wronai train` refuses to overwrite a finished run unless --overwrite; this example always starts afresh.
        saving.check_output_dir(cfg.training.output_dir, overwrite=True, resume=False)

        # 3. Tokenizer (+ pad token, Polish special tokens, then extensions.tokenizer_hook).
        tokenizer = trainer.load_tokenizer()
        log.info("tokenizer: %d tokens, pad=%r", len(tokenizer), tokenizer.pad_token)

        # 4. Model: (4-bit) base model, embeddings resized for the new tokens, k-bit preparation, LoRA adapter.
        model = trainer.load_model()
        trainable, total = model.get_nb_trainable_parameters()
        log.info("model: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")

        # 5. Data: read, hook, format, tokenize, mask the prompt, (pack), cache. A Python hook wins over the config's.
        data_hook = load_object(f"{HERE / 'custom_data_processing.py'}:data_hook", "data_hook")
        prepared = trainer.load_dataset(data_hook=data_hook)
        log.info("data: %d train / %d eval examples, %d rows dropped by the hook",
                 len(prepared.train), len(prepared.eval) if prepared.eval is not None else 0, prepared.stats.dropped_by_hook)  # fmt: skip
        first = prepared.train[0]
        trained = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
        log.info("first example, trained part: %r", tokenizer.decode(trained))

        # 6. Trainer: TrainingArguments mapped for the installed transformers version, WronAI's collator, callbacks.
        throughput_logger = load_object(f"{HERE / 'custom_callback.py'}:ThroughputLogger", "callback")()
        trainer.extra_callbacks.append(throughput_logger)
        trainer.build_trainer()
        metrics = trainer.train()
        log.info("train metrics: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        log.info("callback saw steps %s", throughput_logger.steps)

        # 7. Save: adapter, tokenizer, resolved config, provenance, trainer state, metrics.
        out = trainer.save()
        log.info("saved: %s", ", ".join(sorted(p.name for p in out.iterdir())))

    # 8. Load it back with stock transformers + peft (no WronAI), resizing the embeddings for the added tokens.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    if len(tok) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tok))
    tuned = PeftModel.from_pretrained(base, out).eval()
    prompt = "### Instrukcja:\nNapisz jedno zdanie o Krakowie.\n\n### Odpowiedź:\n"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = tuned.generate(
            **inputs, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
        )
    log.info(
        "generation: %r", tok.decode(generated[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    )


if __name__ == "__main__":
    main()
