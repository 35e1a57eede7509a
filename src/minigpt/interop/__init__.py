"""Models that travel: a trained run written in the formats other tools load, computing exactly what
minigpt computes, or refused with one line naming the switch that has no equivalent there.

    hf.py            `minigpt export RUN --to hf --out DIR`: a Hugging Face transformers directory
    hf_model.py      which stock transformers architecture a layout is, its config.json and weights
    hf_tokenizer.py  the run's tokenizer as tokenizer.json + tokenizer_config.json

Nothing here imports transformers: the files are written with safetensors and tokenizers (minigpt's
own dependencies), and the `hf` extra (`pip install 'minigpt[hf]'`) is what loads them back.
"""
