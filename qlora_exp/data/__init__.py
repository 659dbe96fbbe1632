"""Examples from sources to token sequences: sources, formats, chat templates, tokenization with
exact masks, packing, the tokenized-dataset cache, the synthetic set and the dry-run preview."""
