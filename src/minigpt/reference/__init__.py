"""The NumPy reference backend: a GPT with every gradient written out by hand (model.py) and the
trainer that runs it inside the normal training loop (trainer.py). See docs/backprop.md."""
