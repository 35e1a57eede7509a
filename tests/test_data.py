import json

import numpy as np
import pytest

from minigpt.data.dataset import BatchSampler, load_prepared
from minigpt.data.prepare import prepare
from minigpt.errors import DataError


def test_stream_mode_splits_by_position(tmp_path):
    text = "abcdefghij" * 100
    (tmp_path / "in.txt").write_text(text)
    meta = prepare([tmp_path / "in.txt"], tmp_path / "d")
    data = load_prepared(tmp_path / "d")
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert meta["train_tokens"] == 900 and meta["val_tokens"] == 100
    # the validation split is the *last* 10% of the text
    assert data.tokenizer.decode(data.val.tolist()) == text[900:]
    assert data.tokenizer.decode(data.train.tolist()) == text[:900]


def test_document_mode_wraps_each_name_in_bos_eos(tmp_path):
    names = [f"name{i}" for i in range(50)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    meta = prepare([tmp_path / "names.txt"], tmp_path / "d", docs="lines", val_fraction=0.2, seed=3)
    data = load_prepared(tmp_path / "d")
    tok = data.tokenizer
    assert meta["num_docs"] == {"train": 40, "val": 10}
    ids = data.train.tolist() + data.val.tolist()
    assert ids.count(tok.bos_id) == 50 and ids.count(tok.eos_id) == 50
    decoded, current = [], []
    for i in ids:
        if i == tok.eos_id:
            decoded.append(tok.decode(current))
            current = []
        elif i != tok.bos_id:
            current.append(i)
    assert sorted(decoded) == sorted(names)
    # the split is by document and seeded: same seed, same split
    prepare([tmp_path / "names.txt"], tmp_path / "d2", docs="lines", val_fraction=0.2, seed=3)
    assert load_prepared(tmp_path / "d2").val.tolist() == data.val.tolist()


def test_blank_and_files_modes(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nline two\n\npara two\n\n\npara three\n")
    (tmp_path / "b.txt").write_text("other file\n")
    assert prepare([tmp_path / "a.txt"], tmp_path / "blank", docs="blank")["num_docs"] == {"train": 2, "val": 1}
    meta = prepare([tmp_path], tmp_path / "files", docs="files", val_fraction=0.5)
    assert meta["num_docs"] == {"train": 1, "val": 1}
    assert len(meta["sources"]) == 2


def test_uint32_when_vocabulary_needs_it(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70000))
    (tmp_path / "cjk.txt").write_text(text * 2, encoding="utf-8")
    meta = prepare([tmp_path / "cjk.txt"], tmp_path / "d")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70002


def test_sampler_is_reproducible_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, block_size=8, batch_size=4, seed=7)
    x, y = a.next()
    assert x.shape == (4, 8) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    state = a.state_dict()
    expected = a.next()[0]
    b = BatchSampler(tokens, block_size=8, batch_size=4, seed=999)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert (b.next()[0] == expected).all()


def test_ranks_see_slices_of_the_single_process_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    whole = BatchSampler(tokens, 8, 6, seed=1).next()[0]
    parts = [BatchSampler(tokens, 8, 3, seed=1, rank=r, world_size=2).next()[0] for r in range(2)]
    assert (np.concatenate(parts) == whole.numpy()).all()


def test_split_shorter_than_context_is_refused():
    with pytest.raises(DataError, match="block-size"):
        BatchSampler(np.arange(10, dtype=np.uint16), block_size=16, batch_size=2, seed=0)
