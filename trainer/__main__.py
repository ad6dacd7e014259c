"""`python -m trainer …`: synth, nightly, evaluate, schedule."""

from trainer.cli import app

if __name__ == "__main__":
    app()
