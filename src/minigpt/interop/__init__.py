"""Models that travel: reading weights and tokenizers made elsewhere into minigpt (and, from the
export branches, writing minigpt runs out in other tools' formats).

    gpt2_names.py   the one table of GPT-2 tensor names and which of them transformers stores
                    transposed (Conv1D (in, out) vs minigpt's nn.Linear (out, in))
    hf_import.py    a Hugging Face GPT-2 directory -> minigpt ModelConfig, weights and BPE tokenizer
    init_from.py    `train --init-from SRC`: resolve SRC (run directory, HF directory, Hub name),
                    check the run's flags against it, and record what the run started from

Nothing here unpickles: weights are read from safetensors only.
"""
