"""Using a finished run: prompts, generation and chat, evaluation, merge, GGUF export, the HTML report and the model card."""
