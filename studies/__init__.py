"""Studies that back the model card: run with ``python -m studies.NAME`` (see README.md)."""
