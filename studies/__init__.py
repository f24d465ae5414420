"""Research that backs the model card: run each with ``python -m studies.NAME``."""
