"""A tokenizer hook: add a few Polish domain tokens before the model is built.

WronAI calls the hook right after the tokenizer is loaded (and after ``polish.add_polish_tokens``, if set),
before the base model is loaded. Tokens the hook adds get new embedding rows (initialised to the mean of the
existing rows); those rows are trained and saved with the adapter, and the tokenizer saved in
``training.output_dir`` contains the tokens.

From the YAML config (the path is resolved against the config file's directory, then the working
directory)::

    extensions:
      tokenizer_hook: "examples/custom_tokenization.py:add_domain_tokens"

or on the command line::

    wronai train configs/offline_demo.yaml \\
        --set extensions.tokenizer_hook=examples/custom_tokenization.py:add_domain_tokens

From Python, set the config key before the stages run (``load_model`` sizes the embeddings to the
tokenizer)::

    from wronai.recipe import Pipeline

    trainer = Pipeline("configs/offline_demo.yaml", ["training.max_steps=10"])
    trainer.config.extensions.tokenizer_hook = "examples/custom_tokenization.py:add_domain_tokens"
    trainer.load_tokenizer()      # the hook runs here
    trainer.load_model()          # embeddings resized, new rows trainable
    trainer.load_dataset(); trainer.train(); trainer.save()

or call the function yourself and hand the result to the trainer::

    trainer.tokenizer = add_domain_tokens(trainer.load_tokenizer(), trainer.config)
    trainer.load_model()

To load the result with plain transformers + peft, resize the base model's embeddings to the saved
tokenizer first (see docs/training.md, "Loading the result").
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("examples.custom_tokenization")  # hook files get a generated __name__

#: Markers for domain-tagged training data, e.g. "<prawo>Art. 415 k.c. …</prawo>". They are added as
#: special tokens: never split by BPE, never normalised.
DOMAIN_TOKENS = [
    "<prawo>", "</prawo>",          # law
    "<medycyna>", "</medycyna>",    # medicine
    "<finanse>", "</finanse>",      # finance
]  # fmt: skip


def add_domain_tokens(tokenizer: Any, config: Any) -> Any:
    """Add the tokens of DOMAIN_TOKENS the tokenizer lacks; return the tokenizer (required)."""
    vocab = tokenizer.get_vocab()
    fresh = [token for token in DOMAIN_TOKENS if token not in vocab]
    if fresh:
        tokenizer.add_tokens(fresh, special_tokens=True)
        logger.info(
            "tokenizer_hook: added %d domain tokens for %s (vocabulary now %d): %s",
            len(fresh), config.model.name, len(tokenizer), " ".join(fresh),
        )  # fmt: skip
    return tokenizer
