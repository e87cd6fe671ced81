"""Training: supervised fine-tuning (`Run`, `train`) and preference tuning (DPO) through TRL."""
