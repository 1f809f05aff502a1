"""Export a finished run for other runtimes: a GGUF file (llama.cpp, Ollama) and its Ollama Modelfile."""
