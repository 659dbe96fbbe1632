"""One seed drives sampling, splitting and the random number generators."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed

from qlora_exp.data.module import DataModule, sample_rows, split_rows
from qlora_exp.embedded import resolve_embedded
from qlora_exp.schema import Config


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_embedded("embedded:tiny-gemma2"))


def _datamodule(schema: Config, tokenizer: PreTrainedTokenizerBase, seed: int) -> DataModule:
    schema.data.sample_size = 30
    data = DataModule(schema.data, tokenizer, seed)
    data.setup()
    return data


def test_same_seed_same_sample_and_split(smoke_schema: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    first, second = _datamodule(smoke_schema, tokenizer, 7), _datamodule(smoke_schema, tokenizer, 7)
    assert first.fingerprint == second.fingerprint
    assert first.train_dataset["input_ids"] == second.train_dataset["input_ids"]
    assert first.val_dataset["input_ids"] == second.val_dataset["input_ids"]


def test_other_seed_other_sample_and_split(smoke_schema: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    first, other = _datamodule(smoke_schema, tokenizer, 7), _datamodule(smoke_schema, tokenizer, 8)
    assert first.fingerprint != other.fingerprint
    assert first.val_dataset["input_ids"] != other.val_dataset["input_ids"]


def test_seed_zero_is_a_seed() -> None:
    rows = list(range(100))
    assert sample_rows(rows, 10, 0) == sample_rows(rows, 10, 0)
    assert sample_rows(rows, 10, 0) != sample_rows(rows, 10, 1)


def test_split_is_seeded_disjoint_and_complete() -> None:
    rows = list(range(50))
    train, val = split_rows(rows, 0.2, seed=3)
    assert (train, val) == split_rows(rows, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == rows
    assert split_rows(rows, 0.2, seed=4)[1] != val


def test_sample_larger_than_data_keeps_everything() -> None:
    assert sample_rows([1, 2, 3], 10, 0) == [1, 2, 3]


def test_set_seed_drives_python_numpy_and_torch() -> None:
    set_seed(11)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_seed(11)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_building_an_embedded_model_leaves_the_run_random_state_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cold cache builds the checkpoint inside the run, after set_seed: the run's draws must not move.
    def draws() -> tuple[list[float], float, float]:
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    set_seed(5)
    expected = draws()
    monkeypatch.setenv("QLORA_EXP_CACHE", str(tmp_path))
    set_seed(5)
    built = resolve_embedded("embedded:tiny-gemma2")
    assert built.is_relative_to(tmp_path) and (built / "config.json").is_file()
    assert draws() == expected
