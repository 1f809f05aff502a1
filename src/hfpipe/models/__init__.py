"""Models: a from-scratch GPT-2, pretrained causal LMs and tokenizers (safetensors only), trained runs loaded for the
tools (adapters onto their base, merged), and GGUF files converted to HF dirs."""
