"""sglang-harli: LoRA finetuning on the spare capacity of SGLang decode servers."""
