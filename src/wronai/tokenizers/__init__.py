"""Polish tokenizers: fertility statistics, training a byte-level BPE, extending an existing vocabulary."""
