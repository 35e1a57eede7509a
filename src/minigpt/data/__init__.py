"""Data: reading corpora (corpus.py), preparing them into token memmaps (prepare.py), and the
prepared data plus its batch sampler (dataset.py). bpb.py converts losses to bits per byte."""
