"""Model preparation: tokenizer, base model loading and quantization, embeddings, LoRA, k-bit preparation, tiny local models."""
