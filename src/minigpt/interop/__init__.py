"""Interop: a trained run written in other tools' formats (GGUF for llama.cpp; Hugging Face).

Each exporter maps minigpt's layout onto one architecture of the other tool and writes only what
that tool computes exactly the same way; a layout it cannot express is refused, never approximated.
"""
