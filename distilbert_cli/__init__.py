"""distilbert_cli: distill a BERT-family teacher into a DistilBERT-style student, stage by stage."""

__version__ = "0.1.0"
