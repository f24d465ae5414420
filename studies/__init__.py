"""Studies behind the model card: each is run with ``python -m studies.NAME`` (see README.md)."""
