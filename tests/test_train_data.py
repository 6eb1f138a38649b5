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


def _prefetch_stream():
    from distca.data.stream import PackedStream

    cfg = load_config(None, ["--data.source=synthetic", "--data.distribution=pretrain", "--data.n_docs=300",
                             "--data.max_len=700", "--model.vocab_size=512"])
    return PackedStream(make_source(cfg), 2, 512, seed=5)


def _plans(mb):
    """A plan per window from the micro-batch alone (what the trainer prefetches), compared by digest."""
    from distca.scheduler import BatchLayout, Placement, SchedulerConfig, make_plan

    batch = BatchLayout.from_ranks(mb.packed.ranks, mb.packed.continues)
    return {w: make_plan(batch, Placement(2, 2, "colocated"), SchedulerConfig(eps=0.02, granularity=64, window=w))[0]
            for w in (-1, 48)}


def test_prefetched_steps_equal_steps_prepared_in_place_and_checkpoint_the_position_before_them():
    from distca.train.prefetch import StepPrefetch

    def run(background: bool, steps: int, stop_after: int | None = None):
        stream = _prefetch_stream()
        pre = StepPrefetch(stream, 2, _plans, background=background)
        got, state = [], None
        for step in range(steps):
            prep = pre.take()
            if step + 1 < steps:
                pre.start_next()  # the next step is drawn and planned while this one would train
            got.append(([mb.packed.doc_lengths for mb in prep.micro_batches],
                        [{w: p.digest() for w, p in plans.items()} for plans in prep.parts]))
            if stop_after == step:
                state = pre.stream_state()  # a checkpoint at this step boundary
                break
        pre.close()
        return got, state

    inline, _ = run(False, 5)
    ahead, _ = run(True, 5)
    assert ahead == inline  # the same micro-batches and byte-identical plans, step by step
    assert len({str(g) for g in inline}) == 5  # the steps differ: the check is not vacuous
    # a stop after step 2 (step 3 already prepared in the background) saves the position before step 3's draws
    _, state = run(True, 5, stop_after=2)
    resumed = _prefetch_stream()
    resumed.load_state_dict(state)
    pre = StepPrefetch(resumed, 2, _plans, background=True)
    assert [mb.packed.doc_lengths for mb in pre.take().micro_batches] == inline[3][0]
    pre.close()
