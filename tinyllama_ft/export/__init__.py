"""Export: a merged transformers folder, or one GGUF file with an Ollama Modelfile."""

from .. import forward_to

__getattr__ = forward_to(__name__, "merged")  # the names of `tinyllama_ft.export` from before the wings
