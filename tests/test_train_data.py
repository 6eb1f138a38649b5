"""The config's data sources open through the trainer's one entry, ``make_source``: a jsonl text file with a
local tokenizer.json, synthetic lengths, and token files; a missing file is a config error naming the key.
(Token files and the embedded corpus also feed real training runs in test_train.py.)"""

from __future__ import annotations

import pytest

from distca.config import load_config
from distca.errors import ConfigError
from distca.train.data import make_source


def test_text_source_reads_jsonl_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["the cat sat", "a dog ran"], trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text('{"text": "the cat sat"}\n{"text": "a dog ran the cat"}\n')
    cfg = load_config(None, ["--data.source=text", f"--data.path={tmp_path / 'd.jsonl'}",
                             f"--data.tokenizer={tmp_path / 'tokenizer.json'}"])
    text = make_source(cfg)
    assert len(text) == 2 and text.document(1).tolist() == tok.encode("a dog ran the cat").ids


def test_synthetic_source_spans_the_model_vocabulary():
    synthetic = make_source(load_config(None, ["--data.source=synthetic", "--data.n_docs=50",
                                               "--model.vocab_size=300"]))
    assert len(synthetic) == 50 and synthetic.vocab_size == 300


def test_token_files_open_and_a_missing_one_names_the_key(tmp_path):
    from distca.data import EmbeddedCorpus, tokenize_to_file

    tokenize_to_file(EmbeddedCorpus(max_files=5), tmp_path / "tok")
    assert len(make_source(load_config(None, ["--data.source=tokens", f"--data.path={tmp_path / 'tok'}"]))) == 5
    with pytest.raises(ConfigError, match=r"data\.path.*nothing-here"):
        make_source(load_config(None, ["--data.source=tokens", f"--data.path={tmp_path / 'nothing-here'}"]))
