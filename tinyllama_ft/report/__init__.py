"""Reports: the base-vs-fine-tuned tables, the model card and the figures, rendered from what a run measured."""
