"""Models: resolve and load a model (directory, hub id, GGUF, the demo pair), check that a pair's
tokenizers agree, and wrap prompts in chat templates. Imports nothing above `config`."""
