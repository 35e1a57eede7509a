"""Models that travel: minigpt runs written in the formats other tools load, computing exactly what
minigpt computes or refused with one line naming the switch that has no equivalent there; and
weights and tokenizers made elsewhere read into minigpt.

    hf.py            `minigpt export RUN --to hf --out DIR`: a Hugging Face transformers directory
    hf_model.py      which stock transformers architecture a layout is, its config.json and weights
    hf_tokenizer.py  the run's tokenizer as tokenizer.json + tokenizer_config.json
    gguf.py          `minigpt export RUN --to gguf --out FILE.gguf`: one file for llama.cpp
    gpt2_names.py    the table of GPT-2 tensor names and which of them transformers stores
                     transposed (Conv1D (in, out) vs minigpt's nn.Linear (out, in))
    hf_import.py     a Hugging Face GPT-2 directory -> minigpt ModelConfig, weights and BPE tokenizer
    init_from.py     `train --init-from SRC`: resolve SRC (run directory, HF directory, Hub name),
                     check the run's flags against it, and record what the run started from

Nothing here imports transformers (the files are written and read with safetensors and tokenizers,
minigpt's own dependencies), and nothing unpickles: weights are read from safetensors only.
"""
