"""calm.data: record formats, loss masking, padding, batching and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch

from calm.data import IGNORE, collate, encode, epoch_batches, pad_rows
from calm.recipes.kv.bases import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_text_record_has_loss_on_every_token(tok):
    data = encode([{"text": "abc"}], tok)
    ids = list(data.input_ids[0])
    assert ids == tok("abc")["input_ids"] + [tok.eos_token_id]
    assert list(data.labels[0]) == ids


def test_prompt_completion_masks_the_prompt(tok):
    data = encode([{"prompt": "ab=", "completion": "12"}], tok)
    prompt = tok("ab=")["input_ids"]
    completion = tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(data.input_ids[0]) == prompt + completion
    assert list(data.labels[0]) == [IGNORE] * len(prompt) + completion
    assert data.num_targets([0]) == len(completion)


def test_pretokenized_records_need_no_tokenizer():
    data = encode([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6], "labels": [IGNORE, 6]}])
    assert data.labels == ((5, 6, 7), (IGNORE, 6))


def test_jsonl_and_datasets_sources_agree(tok, tmp_path):
    records = [{"text": "ab"}, {"prompt": "a", "completion": "b"}]
    from datasets import Dataset

    from_file = encode(write_jsonl(tmp_path / "d.jsonl", records), tok)
    from_list = encode(records, tok)
    from_hf = encode(Dataset.from_list([{"text": "ab"}]), tok)
    assert from_file.input_ids == from_list.input_ids
    assert from_hf.input_ids == from_list.input_ids[:1]


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ab"}, '{"text": "a', {"text": "c"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        encode(path, tok)
    path = write_jsonl(tmp_path / "arr.jsonl", [{"text": "ab"}, "[1, 2]"])
    with pytest.raises(ValueError, match=r"arr\.jsonl, line 2: expected a JSON object"):
        encode(path, tok)


def test_missing_fields_named(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"prompt": "a"}])
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: a record needs 'text'.*\['prompt'\]"):
        encode(path, tok)
    with pytest.raises(ValueError, match="field 'text' must be a string"):
        encode([{"text": 3}], tok)
    with pytest.raises(ValueError, match="'labels' has 1 entries but 'input_ids' has 2"):
        encode([{"input_ids": [4, 5], "labels": [4]}])
    with pytest.raises(ValueError, match="need the anchor's tokenizer"):
        encode([{"text": "ab"}])


def test_empty_data_set_and_missing_file(tok, tmp_path):
    with pytest.raises(ValueError, match="holds no records"):
        encode(write_jsonl(tmp_path / "empty.jsonl", []), tok)
    with pytest.raises(ValueError, match="holds no records"):
        encode([], tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode(tmp_path / "nope.jsonl", tok)
    with pytest.raises(TypeError, match="JSONL path, a list of dicts"):
        encode(42, tok)


def test_truncation_counts_or_refuses(tok):
    records = [{"text": "abcdefgh"}, {"text": "ab"}, {"prompt": "abcdefgh", "completion": "1"}]
    data = encode(records, tok, max_length=5)
    assert [len(x) for x in data.input_ids] == [5, 4]
    assert (data.num_truncated, data.num_dropped) == (2, 1)  # the prompt filled all 5 tokens
    with pytest.raises(ValueError, match="record 0: 10 tokens, more than max_length=5"):
        encode(records, tok, max_length=5, truncation="error")


def test_collate_right_pads_and_ignores_padding():
    data = encode([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    batch = collate(data, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE]]


def test_pad_rows_right_and_left():
    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_rows([(5, 6, 7), (8,)], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pad_rows([[]], pad_id=0)[0].shape == (1, 1)
    with pytest.raises(ValueError, match="side must be one of"):
        pad_rows([[1]], 0, side="middle")


def test_epoch_batches_deterministic_and_bucketed():
    lengths = [((i * 7) % 13) + 1 for i in range(40)]
    a = epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(40))
    bucketed = epoch_batches(lengths, 4, seed=1, epoch=0, bucket=True)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bucketed)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a)
    assert [len(b) for b in epoch_batches(lengths[:10], 4, 0, 0, min_size=4)] == [4, 4]
