"""Storage: atomic writes, what defines a run, the run folder's life (check, resume, save) and the one loader."""
