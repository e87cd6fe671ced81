"""Data: rows in any format -> one conversation shape -> token ids and labels, the split, preference pairs."""

from .. import forward_to

__getattr__ = forward_to(__name__, "prepare")  # the names of `tinyllama_ft.data` from before the wings
