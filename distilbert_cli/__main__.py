"""`python -m distilbert_cli` (and `accelerate launch -m distilbert_cli train ...`)."""

from distilbert_cli.cli import main

if __name__ == "__main__":
    main()
