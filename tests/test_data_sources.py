"""Training data pipeline: document sources (distca.data.sources and the source modules) and the
resumable packing stream (distca.data.stream)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from distca.data import (
    IGNORE_INDEX,
    SOURCE_KINDS,
    ByteTokenizer,
    DataError,
    DocumentSource,
    EmbeddedCorpus,
    LengthDistribution,
    MicroBatch,
    PackedBatch,
    PackedStream,
    SyntheticSource,
    TextSource,
    TokenFileSource,
    open_source,
    token_file_paths,
    tokenize_to_file,
    write_token_file,
)
from distca.data.embedded_corpus import EXCLUDED_DIRS

# ---------------------------------------------------------------- helpers


class ListSource:
    """In-memory source: document i has the given length and distinct, recognisable token ids."""

    def __init__(self, lengths: list[int], vocab_size: int = 997, name: str = "list") -> None:
        self.docs = [(np.arange(n, dtype=np.int64) * 31 + i * 101) % vocab_size for i, n in enumerate(lengths)]
        self.vocab_size = vocab_size
        self.name = name

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, i: int) -> np.ndarray:
        return self.docs[i].copy()

    def length(self, i: int) -> int:
        return len(self.docs[i])


@pytest.fixture(scope="module")
def corpus() -> EmbeddedCorpus:
    return EmbeddedCorpus()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran to the cat", "hello world"], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


TEXTS = ["the cat sat on the mat", "hello world", "a dog ran to the cat and the cat ran", "zebra unknown words"]


def packed_docs(batch: MicroBatch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, labels, positions) of every packed document, reassembled from the per-rank pieces."""
    pos = batch.position_ids()
    docs: dict[int, list[list[np.ndarray]]] = {}
    for r, (pieces, ids) in enumerate(zip(batch.packed.ranks, batch.packed.doc_ids, strict=True)):
        a = 0
        for x, d in zip(pieces, ids, strict=True):
            parts = docs.setdefault(d, [[], [], []])
            for k, arr in enumerate((batch.tokens[r], batch.labels[r], pos[r])):
                parts[k].append(arr[a: a + x])
            a += x
    return [tuple(np.concatenate(p) for p in docs[d]) for d in range(len(docs))]


def check_batch(batch: MicroBatch, source: DocumentSource, n_ranks: int, tpr: int, mdt: int | None) -> None:
    """Every invariant of one micro-batch against its source."""
    assert isinstance(batch.packed, PackedBatch)
    assert batch.packed.n_ranks == n_ranks and batch.packed.rank_tokens == [tpr] * n_ranks
    assert PackedBatch.from_json(batch.packed.to_json()) == batch.packed
    for t, y in zip(batch.tokens, batch.labels, strict=True):
        assert t.dtype == np.int64 and y.dtype == np.int64 and t.shape == y.shape == (tpr,)
    docs = packed_docs(batch)
    assert len(docs) == len(batch.slices) == len(batch.packed.doc_lengths)
    for (tok, lab, pos), s in zip(docs, batch.slices, strict=True):
        assert s.length == len(tok) >= 1
        np.testing.assert_array_equal(tok, source.document(s.doc)[s.start: s.start + s.length])
        np.testing.assert_array_equal(lab, np.append(tok[1:], IGNORE_INDEX))
        np.testing.assert_array_equal(pos, np.arange(len(tok)))
        if mdt is not None:
            assert s.start // mdt == (s.start + s.length - 1) // mdt  # never crosses a chunk boundary
            assert s.length <= mdt


def check_coverage(batches: list[MicroBatch], source: DocumentSource, seed: int, shuffle: bool) -> None:
    """Slices across batches walk the epochs' orders with no token lost or repeated."""
    slices = [s for b in batches for s in b.slices]
    n = len(source)
    epoch, cursor, offset = 0, 0, 0
    for s in slices:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        assert (s.epoch, s.doc, s.start) == (epoch, int(order[cursor]), offset)
        offset += s.length
        if offset == source.length(s.doc):
            offset, cursor = 0, cursor + 1
            if cursor == n:
                epoch, cursor = epoch + 1, 0
    assert [b.step for b in batches] == list(range(len(batches)))


def same_batches(a: list[MicroBatch], b: list[MicroBatch]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.parts != y.parts or x.slices != y.slices or x.step != y.step:
            return False
        for u, v in zip(x.tokens + x.labels, y.tokens + y.labels, strict=True):
            if not np.array_equal(u, v):
                return False
    return True


def take(stream: PackedStream, k: int) -> list[MicroBatch]:
    return [stream.next_micro_batch() for _ in range(k)]


# ---------------------------------------------------------------- embedded corpus


def test_byte_tokenizer_round_trip():
    bt = ByteTokenizer()
    text = "héllo → wörld\n"
    ids = bt.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text.encode()) and bt.decode(ids) == text
    assert bt.decode(ids[:2]) == "h\ufffd"  # cut mid-character: replacement, no error
    with pytest.raises(DataError, match="256"):
        bt.decode([1, 300])


def test_embedded_corpus_is_large_and_long_tailed(corpus):
    assert isinstance(corpus, DocumentSource)
    assert corpus.vocab_size == 256 and corpus.name.startswith("embedded:stdlib")
    lengths = corpus.lengths
    assert len(corpus) > 500 and (lengths >= 1).all()
    assert lengths.max() / np.median(lengths) > 10
    paths = [corpus.path(i) for i in range(len(corpus))]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert not any(set(p.split("/")[:-1]) & EXCLUDED_DIRS for p in paths)
    assert "os.py" in paths and "idlelib/idle_test/__init__.py" not in paths
    for i in (0, len(corpus) // 2, int(np.argmax(lengths))):
        doc = corpus.document(i)
        assert doc.dtype == np.int64 and len(doc) == corpus.length(i)
        assert corpus.tokenizer.decode(doc) == (corpus.root / corpus.path(i)).read_text(encoding="utf-8")


def test_embedded_corpus_options(tmp_path, corpus):
    small = EmbeddedCorpus(max_files=5)
    assert len(small) == 5 and [small.path(i) for i in range(5)] == [corpus.path(i) for i in range(5)]
    big = EmbeddedCorpus(min_bytes=50_000)
    assert len(big) < len(corpus) and big.lengths.min() >= 50_000
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "b.py").write_text("print('b')\n")
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "empty.py").write_text("")
    (tmp_path / "pkg" / "notes.txt").write_text("not python")
    (tmp_path / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (tmp_path / "site-packages" / "lib.py").write_text("y = 2\n")
    own = EmbeddedCorpus(root=tmp_path)
    assert [own.path(i) for i in range(len(own))] == ["b.py", "pkg/a.py"]
    assert own.name == f"embedded:{tmp_path.name}"
    with pytest.raises(DataError, match="out of range"):
        own.document(2)
    with pytest.raises(DataError, match="out of range"):
        own.length(-1)
    (tmp_path / "b.py").write_text("print('changed')\n")
    with pytest.raises(DataError, match="changed since"):
        own.document(0)
    with pytest.raises(DataError, match=r"no \.py file"):
        EmbeddedCorpus(root=tmp_path / "pkg" / "tests", min_bytes=100)
    with pytest.raises(DataError, match="not a directory"):
        EmbeddedCorpus(root=tmp_path / "missing")
    with pytest.raises(DataError, match="max_files"):
        EmbeddedCorpus(max_files=0)


# ---------------------------------------------------------------- token files


def test_token_file_round_trip(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([7]), np.arange(100, 160)]
    meta = write_token_file(tmp_path / "ds", docs)
    assert meta == {"format": "distca-tokens", "version": 1, "dtype": "uint16", "n_docs": 3, "n_tokens": 64,
                    "vocab_size": 160}
    bin_path, off_path, meta_path = token_file_paths(tmp_path / "ds")
    assert json.loads(meta_path.read_text()) == meta and bin_path.stat().st_size == 64 * 2
    np.testing.assert_array_equal(np.load(off_path), [0, 3, 4, 64])
    src = TokenFileSource(tmp_path / "ds")
    assert isinstance(src, DocumentSource)
    assert len(src) == 3 and src.vocab_size == 160 and src.n_tokens == 64 and src.name == "tokens:ds"
    assert [src.length(i) for i in range(3)] == [3, 1, 60]
    for i, d in enumerate(docs):
        out = src.document(i)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, d)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_token_file_dtypes(tmp_path):
    assert write_token_file(tmp_path / "wide", [[0, 70_000]])["dtype"] == "uint32"
    np.testing.assert_array_equal(TokenFileSource(tmp_path / "wide").document(0), [0, 70_000])
    meta = write_token_file(tmp_path / "given", [[1, 2]], dtype="int64", vocab_size=50)
    assert meta["dtype"] == "int64" and meta["vocab_size"] == 50
    big = 2**40
    write_token_file(tmp_path / "huge", [[big]], dtype="int64")
    assert TokenFileSource(tmp_path / "huge").document(0)[0] == big
    with pytest.raises(DataError, match="dtype='int64'"):
        write_token_file(tmp_path / "auto", [[big]])
    with pytest.raises(DataError, match="outside"):
        write_token_file(tmp_path / "small", [[300]], dtype="uint8")
    with pytest.raises(DataError, match="dtype must be one of"):
        write_token_file(tmp_path / "x", [[1]], dtype="float32")


@pytest.mark.parametrize(("docs", "match"), [
    ([[1, 2], []], "document 1 must be a non-empty"),
    ([[1, -2]], "token id -2"),
    ([np.array([0.5, 1.0])], "integer token ids"),
    ([np.zeros((2, 2), dtype=np.int64)], "1-D"),
    ([], "no documents"),
])
def test_write_token_file_rejects_bad_documents(tmp_path, docs, match):
    with pytest.raises(DataError, match=match):
        write_token_file(tmp_path / "ds", docs)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_write_token_file_errors_and_atomicity(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_token_file(tmp_path / "nodir" / "ds", [[1]])
    with pytest.raises(DataError, match="vocab_size 3"):
        write_token_file(tmp_path / "ds", [[1, 5]], vocab_size=3)
    write_token_file(tmp_path / "ds", [[1, 2, 3]])

    def failing():
        yield np.array([9, 9])
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_token_file(tmp_path / "ds", failing())
    np.testing.assert_array_equal(TokenFileSource(tmp_path / "ds").document(0), [1, 2, 3])  # old data intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.meta.json", "ds.offsets.npy", "ds.tokens.bin"]


def _corrupt_meta(tmp_path: Path, **changes: object) -> None:
    meta_path = token_file_paths(tmp_path / "ds")[2]
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


CORRUPTIONS = {
    "missing meta": (lambda p: token_file_paths(p / "ds")[2].unlink(), "ds.meta.json is missing"),
    "meta not json": (lambda p: token_file_paths(p / "ds")[2].write_text("{oops"), "ds.meta.json is not readable"),
    "wrong format": (lambda p: _corrupt_meta(p, format="other"), "expected format 'distca-tokens'"),
    "wrong version": (lambda p: _corrupt_meta(p, version=2), "version 2"),
    "unknown dtype": (lambda p: _corrupt_meta(p, dtype="float16"), "dtype must be one of"),
    "bad vocab": (lambda p: _corrupt_meta(p, vocab_size=0), "'vocab_size' must be an int"),
    "missing offsets": (lambda p: token_file_paths(p / "ds")[1].unlink(), "ds.offsets.npy is missing"),
    "offsets garbage": (lambda p: token_file_paths(p / "ds")[1].write_bytes(b"junk"), "not a readable .npy"),
    "offsets dtype": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([0, 3, 4, 10], dtype=np.int32)),
                      "1-D int64"),
    "offsets count": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([0, 3, 10])), "3 offsets for 3"),
    "offsets start": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([1, 3, 4, 10])), "start at 0"),
    "offsets not monotone": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([0, 5, 4, 10])),
                             r"offsets\[1\] = 5, offsets\[2\] = 4"),
    "empty document": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([0, 3, 3, 10])),
                       "strictly increasing"),
    "offsets end": (lambda p: np.save(token_file_paths(p / "ds")[1], np.array([0, 3, 4, 9])), "last offset 9"),
    "missing bin": (lambda p: token_file_paths(p / "ds")[0].unlink(), "ds.tokens.bin is missing"),
    "truncated bin": (lambda p: token_file_paths(p / "ds")[0].write_bytes(b"\0" * 15),
                      "ds.tokens.bin has 15 bytes, expected 20"),
    "n_tokens mismatch": (lambda p: _corrupt_meta(p, n_tokens=11), "last offset 10 != n_tokens 11"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_token_file_corruption_is_named(tmp_path, case):
    write_token_file(tmp_path / "ds", [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]])
    corrupt, match = CORRUPTIONS[case]
    corrupt(tmp_path)
    with pytest.raises(DataError, match=match) as info:
        TokenFileSource(tmp_path / "ds")
    assert str(tmp_path) in str(info.value)  # the message names the file


def test_token_file_ids_checked_lazily_per_document(tmp_path):
    write_token_file(tmp_path / "ds", [[1, 2], [3, 4]])
    _corrupt_meta(tmp_path, vocab_size=4)  # document 1 now holds an id >= vocab_size
    src = TokenFileSource(tmp_path / "ds")
    np.testing.assert_array_equal(src.document(0), [1, 2])
    with pytest.raises(DataError, match=r"ds.tokens.bin: document 1 has token id 4 outside \[0, 4\)"):
        src.document(1)


def test_tokenize_to_file_from_any_source(tmp_path, corpus):
    syn = SyntheticSource("uniform", n_docs=20, vocab_size=70_000, seed=3, params={"lo": 1, "hi": 40})
    out = tokenize_to_file(syn, tmp_path / "syn")
    assert out.dtype == np.uint32 and out.vocab_size == 70_000 and len(out) == 20
    for i in range(20):
        np.testing.assert_array_equal(out.document(i), syn.document(i))
    small = EmbeddedCorpus(max_files=10)
    out = tokenize_to_file(small, tmp_path / "emb")
    assert out.dtype == np.uint16 and out.vocab_size == 256
    np.testing.assert_array_equal(out.lengths, small.lengths)
    np.testing.assert_array_equal(out.document(9), small.document(9))


# ---------------------------------------------------------------- text datasets


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_source_tokenizes_lazily(tmp_path, tokenizer_json):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": t, "id": i} for i, t in enumerate(TEXTS[:2])] + [{"text": ""}])
    with open(path, "a") as f:
        f.write("\n")  # blank line: skipped
        f.write(json.dumps({"text": TEXTS[2]}) + "\n")
    tok = Tokenizer.from_file(str(tokenizer_json))
    src = TextSource(path, tokenizer_json)
    assert isinstance(src, DocumentSource)
    assert len(src) == 3 and src.n_skipped == 1 and src.name == "text:data.jsonl"
    assert src.vocab_size == tok.get_vocab_size()
    assert src.where(2) == f"{path}:5"
    for i, text in enumerate([TEXTS[0], TEXTS[1], TEXTS[2]]):
        want = tok.encode(text, add_special_tokens=False).ids
        np.testing.assert_array_equal(src.document(i), want)
        assert src.length(i) == len(want) and src.text(i) == text
    eos = TextSource(path, tokenizer_json, append_eos="</s>")
    assert eos.document(0)[-1] == tok.token_to_id("</s>") and eos.length(0) == src.length(0) + 1
    other_key = tmp_path / "other.jsonl"
    _write_jsonl(other_key, [{"body": "hello world"}])
    np.testing.assert_array_equal(TextSource(other_key, tokenizer_json, text_key="body").document(0),
                                  tok.encode("hello world", add_special_tokens=False).ids)


@pytest.mark.parametrize(("line", "match"), [
    ('{"text": "ok"', "not valid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"body": "x"}', "no key 'text'"),
    ('{"text": 3}', "must be a string"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer_json, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=match) as info:
        TextSource(path, tokenizer_json)
    assert f"{path}:3:" in str(info.value)


def test_text_source_errors(tmp_path, tokenizer_json):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"text": "   "}])
    with pytest.raises(DataError, match=r"data.jsonl:1: text tokenises to no token"):
        TextSource(path, tokenizer_json).document(0)
    with pytest.raises(DataError, match=r"tokenizer file .* does not exist"):
        TextSource(path, tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        TextSource(path, tmp_path / "broken.json")
    with pytest.raises(DataError, match="append_eos token '<eos>' is not in the vocabulary"):
        TextSource(path, tokenizer_json, append_eos="<eos>")
    (tmp_path / "data.csv").write_text("text\nhi\n")
    with pytest.raises(DataError, match=r"must end in one of \['.jsonl', '.parquet'\]"):
        TextSource(tmp_path / "data.csv", tokenizer_json)
    with pytest.raises(DataError, match="does not exist"):
        TextSource(tmp_path / "nope.jsonl", tokenizer_json)
    _write_jsonl(path, [{"text": ""}])
    with pytest.raises(DataError, match="no record with a non-empty 'text'"):
        TextSource(path, tokenizer_json)


def test_parquet_source(tmp_path, tokenizer_json):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [TEXTS[0], "", TEXTS[3]], "n": [1, 2, 3]}), path)
    tok = Tokenizer.from_file(str(tokenizer_json))
    src = TextSource(path, tokenizer_json, append_eos="</s>")
    assert len(src) == 2 and src.n_skipped == 1 and src.where(1) == f"{path} row 2"
    for i, text in enumerate([TEXTS[0], TEXTS[3]]):
        np.testing.assert_array_equal(src.document(i), [*tok.encode(text, add_special_tokens=False).ids, 1])
    out = tokenize_to_file(src, tmp_path / "pq")
    assert out.vocab_size == src.vocab_size
    np.testing.assert_array_equal(out.document(1), src.document(1))
    with pytest.raises(DataError, match=r"no column 'body' \(columns: \['text', 'n'\]\)"):
        TextSource(path, tokenizer_json, text_key="body")
    with pytest.raises(DataError, match="column 'n' must hold strings"):
        TextSource(path, tokenizer_json, text_key="n")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match="the first at row 1"):
        TextSource(tmp_path / "nulls.parquet", tokenizer_json)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet file"):
        TextSource(tmp_path / "junk.parquet", tokenizer_json)


# ---------------------------------------------------------------- synthetic source and factory


def test_synthetic_source_follows_distribution():
    src = SyntheticSource("pretrain", n_docs=4000, vocab_size=1000, seed=5)
    lengths = src.lengths
    assert 0.9 * 3200 < np.median(lengths) < 1.1 * 3200 and lengths.max() <= 125_000
    np.testing.assert_array_equal(lengths, LengthDistribution("pretrain").sample(n_docs=4000, seed=5))
    doc = src.document(17)
    assert len(doc) == src.length(17) and doc.min() >= 0 and doc.max() < 1000 and doc.dtype == np.int64
    np.testing.assert_array_equal(doc, SyntheticSource("pretrain", n_docs=4000, vocab_size=1000, seed=5).document(17))
    assert not np.array_equal(src.document(0)[:50], SyntheticSource("pretrain", 4000, 1000, seed=6).document(0)[:50])
    capped = SyntheticSource(LengthDistribution("prolong"), n_docs=500, vocab_size=10, max_len=4096)
    assert capped.lengths.max() == 4096 and capped.name == "synthetic:prolong:seed0"
    uni = SyntheticSource("uniform", n_docs=2000, vocab_size=10, params={"lo": 3, "hi": 9})
    assert uni.lengths.min() == 3 and uni.lengths.max() == 9
    with pytest.raises(DataError, match="needs parameter"):
        SyntheticSource("uniform", n_docs=5, vocab_size=10)
    with pytest.raises(DataError, match="n_docs"):
        SyntheticSource("pretrain", n_docs=0, vocab_size=10)


def test_open_source_factory(tmp_path, tokenizer_json):
    assert sorted(SOURCE_KINDS) == ["embedded", "synthetic", "text", "tokens"]
    assert isinstance(open_source("embedded", max_files=3), EmbeddedCorpus)
    syn = open_source("synthetic", distribution="fixed", params={"length": 4}, n_docs=3, vocab_size=9)
    assert isinstance(syn, SyntheticSource) and syn.lengths.tolist() == [4, 4, 4]
    write_token_file(tmp_path / "ds", [[1]])
    assert isinstance(open_source("tokens", path_prefix=tmp_path / "ds"), TokenFileSource)
    _write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    assert isinstance(open_source("text", path=tmp_path / "d.jsonl", tokenizer_json=tokenizer_json), TextSource)
    with pytest.raises(DataError, match=r"unknown data source kind 'hf'; valid kinds: \['embedded', 'synthetic'"):
        open_source("hf")
    with pytest.raises(DataError, match=r"bad arguments for data source 'embedded'.*accepted"):
        open_source("embedded", max_file=3)


# ---------------------------------------------------------------- packing stream


def test_stream_hand_worked_example():
    src = ListSource([5, 3, 7])
    stream = PackedStream(src, n_ranks=2, tokens_per_rank=4, seed=0, shuffle=False)
    b0, b1, b2 = take(stream, 3)
    d0, d1, _ = src.docs
    # doc 0 (5 tokens) spans ranks 0-1; doc 1 fills rank 1
    assert b0.packed.ranks == [[4], [1, 3]] and b0.packed.continues == [False, True]
    np.testing.assert_array_equal(b0.tokens[0], d0[:4])
    np.testing.assert_array_equal(b0.labels[0], d0[1:5])  # last token of rank 0 -> first token of rank 1
    np.testing.assert_array_equal(b0.labels[1], [IGNORE_INDEX, *d1[1:], IGNORE_INDEX])
    np.testing.assert_array_equal(b0.position_ids()[1], [4, 0, 1, 2])
    # doc 2 (7) then epoch 1 starts with doc 0 again; its rest is carried into the next micro-batch
    assert b1.packed.ranks == [[4], [3, 1]] and b1.packed.continues == [False, True]
    assert [(s.doc, s.start, s.length, s.epoch) for s in b1.slices] == [(2, 0, 7, 0), (0, 0, 1, 1)]
    assert b1.labels[1][-1] == IGNORE_INDEX
    assert [(s.doc, s.start, s.length, s.epoch) for s in b2.slices] == [(0, 1, 4, 1), (1, 0, 3, 1), (2, 0, 1, 1)]
    np.testing.assert_array_equal(b2.tokens[0], d0[1:])
    np.testing.assert_array_equal(b2.position_ids()[0], [0, 1, 2, 3])  # carried-over piece: positions restart
    for b in (b0, b1, b2):
        check_batch(b, src, 2, 4, None)
    check_coverage([b0, b1, b2], src, seed=0, shuffle=False)


def test_stream_over_embedded_corpus(corpus):
    stream = PackedStream(corpus, n_ranks=4, tokens_per_rank=2048, seed=1, max_doc_tokens=8192)
    batches = take(stream, 12)
    for b in batches:
        check_batch(b, corpus, 4, 2048, 8192)
    check_coverage(batches, corpus, seed=1, shuffle=True)
    assert any(any(c for c in b.packed.continues) for b in batches)
    assert any(len(p) > 1 for b in batches for p in b.packed.ranks)


def test_max_doc_tokens_chunks_long_documents():
    src = ListSource([23, 2])
    stream = PackedStream(src, n_ranks=1, tokens_per_rank=30, seed=0, max_doc_tokens=10, shuffle=False)
    b = stream.next_micro_batch()
    assert b.packed.ranks == [[10, 10, 3, 2, 5]]
    assert [(s.doc, s.start) for s in b.slices] == [(0, 0), (0, 10), (0, 20), (1, 0), (0, 0)]
    np.testing.assert_array_equal(b.position_ids()[0][:12], [*range(10), 0, 1])
    assert (b.labels[0][[9, 19, 22, 24, 29]] == IGNORE_INDEX).all()
    check_batch(b, src, 1, 30, 10)
    b = stream.next_micro_batch()  # carried piece of chunk [0, 10) starts mid-chunk and stops at its end
    assert [(s.doc, s.start, s.length) for s in b.slices][:2] == [(0, 5, 5), (0, 10, 10)]
    check_batch(b, src, 1, 30, 10)


def test_multi_epoch_wrap_visits_every_token_each_epoch():
    src = ListSource([3, 9, 1, 4, 6])
    stream = PackedStream(src, n_ranks=3, tokens_per_rank=5, seed=11)
    batches = take(stream, 10)  # 150 tokens = 6.5 epochs of 23 tokens
    for b in batches:
        check_batch(b, src, 3, 5, None)
    check_coverage(batches, src, seed=11, shuffle=True)
    assert stream.epoch == 6
    orders = {e: [s.doc for b in batches for s in b.slices if s.epoch == e and s.start == 0] for e in range(6)}
    assert all(sorted(o) == list(range(5)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # a new order each epoch
    for e in range(6):
        toks = sum(s.length for b in batches for s in b.slices if s.epoch == e)
        assert toks == 23


def test_stream_is_deterministic_and_seeded(corpus):
    a = take(PackedStream(corpus, 2, 1024, seed=3), 4)
    b = take(PackedStream(corpus, 2, 1024, seed=3), 4)
    c = take(PackedStream(corpus, 2, 1024, seed=4), 4)
    assert same_batches(a, b) and not same_batches(a, c)
    plain = take(PackedStream(corpus, 2, 1024, seed=3, shuffle=False), 1)[0]
    assert plain.slices[0].doc == 0


@pytest.mark.parametrize("mdt", [None, 3000])
def test_exact_resume_through_json(corpus, mdt):
    def make() -> PackedStream:
        return PackedStream(corpus, n_ranks=3, tokens_per_rank=1500, seed=9, max_doc_tokens=mdt)

    straight = take(make(), 7)
    first = make()
    head = take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    tail = take(resumed, 4)
    assert same_batches(straight, head + tail)
    assert state["step"] == 3 and set(state) >= {"epoch", "cursor", "offset", "seed", "fingerprint"}


def test_resume_restores_seed_and_crosses_epochs():
    src = ListSource([7, 2, 5, 11])
    straight = take(PackedStream(src, 2, 3, seed=2), 12)
    first = PackedStream(src, 2, 3, seed=2)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    other_seed = PackedStream(src, 2, 3, seed=99)
    other_seed.load_state_dict(state)  # the state's seed wins: exact resume
    assert same_batches(straight[5:], take(other_seed, 7))


def test_load_state_rejects_other_source_or_shape(corpus):
    src = ListSource([4, 4, 4])
    stream = PackedStream(src, 2, 3, seed=0)
    take(stream, 2)
    state = json.loads(json.dumps(stream.state_dict()))
    with pytest.raises(DataError, match="n_docs: state 3 vs stream 4"):
        PackedStream(ListSource([4, 4, 4, 4]), 2, 3).load_state_dict(state)
    with pytest.raises(DataError, match="source: state 'list' vs stream 'other'"):
        PackedStream(ListSource([4, 4, 4], name="other"), 2, 3).load_state_dict(state)
    with pytest.raises(DataError, match="tokens_per_rank: state 3 vs stream 4"):
        PackedStream(src, 2, 4).load_state_dict(state)
    with pytest.raises(DataError, match="max_doc_tokens: state None vs stream 2"):
        PackedStream(src, 2, 3, max_doc_tokens=2).load_state_dict(state)
    fresh = PackedStream(src, 2, 3)
    with pytest.raises(DataError, match="keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "step"})
    with pytest.raises(DataError, match="cursor 3 out of range"):
        fresh.load_state_dict({**state, "cursor": 3})
    with pytest.raises(DataError, match="offset 4 is past the end"):
        fresh.load_state_dict({**state, "offset": 4})
    with pytest.raises(DataError, match="'epoch' must be an int"):
        fresh.load_state_dict({**state, "epoch": -1})
    with pytest.raises(DataError, match="format"):
        fresh.load_state_dict({**state, "format": "x"})
    assert fresh.state_dict()["step"] == 0 and fresh.seed == 0  # failed loads change nothing


def test_stream_rejects_bad_arguments_and_documents():
    src = ListSource([3])
    for kw, match in [({"n_ranks": 0}, "n_ranks"), ({"tokens_per_rank": 2.0}, "tokens_per_rank"),
                      ({"max_doc_tokens": 0}, "max_doc_tokens"), ({"seed": -1}, "seed"),
                      ({"shuffle": 1}, "shuffle")]:
        args = {"n_ranks": 1, "tokens_per_rank": 2, **kw}
        with pytest.raises(DataError, match=match):
            PackedStream(src, **args)
    with pytest.raises(DataError, match="no documents"):
        PackedStream(ListSource([]), 1, 1)
    bad = ListSource([3, 3], vocab_size=10)
    bad.docs[1] = np.array([1, 2, 10])
    stream = PackedStream(bad, 1, 4, shuffle=False)
    with pytest.raises(DataError, match=r"data source list, document 1: token id 10 outside \[0, 10\)"):
        stream.next_micro_batch()
    assert stream.state_dict()["step"] == 0  # a failed batch does not advance the stream


@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=10),
    n_ranks=st.integers(1, 4),
    tpr=st.integers(1, 16),
    mdt=st.none() | st.integers(1, 12),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    n_batches=st.integers(1, 6),
    cut=st.integers(0, 6),
)
def test_packing_stream_properties(lengths, n_ranks, tpr, mdt, shuffle, seed, n_batches, cut):
    src = ListSource(lengths)
    batches = take(PackedStream(src, n_ranks, tpr, seed=seed, max_doc_tokens=mdt, shuffle=shuffle), n_batches)
    for b in batches:
        check_batch(b, src, n_ranks, tpr, mdt)
    check_coverage(batches, src, seed=seed, shuffle=shuffle)
    cut = min(cut, n_batches)
    first = PackedStream(src, n_ranks, tpr, seed=seed, max_doc_tokens=mdt, shuffle=shuffle)
    head = take(first, cut)
    resumed = PackedStream(src, n_ranks, tpr, seed=seed, max_doc_tokens=mdt, shuffle=shuffle)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same_batches(batches, head + take(resumed, n_batches - cut))


def test_token_file_source_streams_like_its_origin(tmp_path):
    syn = SyntheticSource("uniform", n_docs=30, vocab_size=500, seed=1, params={"lo": 1, "hi": 200})
    tf = tokenize_to_file(syn, tmp_path / "syn")
    a = take(PackedStream(syn, 2, 256, seed=4), 5)
    b = take(PackedStream(tf, 2, 256, seed=4), 5)
    for x, y in zip(a, b, strict=True):
        assert x.packed == y.packed and x.slices == y.slices
        assert all(np.array_equal(u, v) for u, v in zip(x.tokens + x.labels, y.tokens + y.labels, strict=True))
    assert os.path.getsize(token_file_paths(tmp_path / "syn")[0]) == tf.n_tokens * 2


@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=10),
    n_ranks=st.integers(1, 4),
    half=st.integers(1, 8),
    mdt=st.none() | st.integers(1, 12),
    seed=st.integers(0, 3),
    n_batches=st.integers(1, 4),
    cut=st.integers(0, 4),
)
def test_two_part_micro_batches_are_two_half_batches_side_by_side(lengths, n_ranks, half, mdt, seed, n_batches, cut):
    """``parts=2`` (``train.nano_split: repack``): micro-batch k is micro-batches 2k and 2k + 1 of the same stream
    at half the tokens per rank — the same documents, cuts and carry-over at the half — with rank r's rows of the
    first, then of the second; it resumes exactly and refuses a state of the one-part stream."""
    src = ListSource(lengths)
    two = take(PackedStream(src, n_ranks, 2 * half, seed=seed, max_doc_tokens=mdt, parts=2), n_batches)
    ones = take(PackedStream(src, n_ranks, half, seed=seed, max_doc_tokens=mdt), 2 * n_batches)
    for k, b in enumerate(two):
        a, c = ones[2 * k], ones[2 * k + 1]
        assert b.parts == (a.packed, c.packed) and b.slices == a.slices + c.slices and b.step == k
        assert b.doc_lengths == a.packed.doc_lengths + c.packed.doc_lengths
        for r in range(n_ranks):
            np.testing.assert_array_equal(b.tokens[r], np.concatenate([a.tokens[r], c.tokens[r]]))
            np.testing.assert_array_equal(b.labels[r], np.concatenate([a.labels[r], c.labels[r]]))
            np.testing.assert_array_equal(b.position_ids()[r], np.concatenate([a.position_ids()[r],
                                                                               c.position_ids()[r]]))
        with pytest.raises(DataError, match="2 independent parts"):
            _ = b.packed
    cut = min(cut, n_batches)
    first = PackedStream(src, n_ranks, 2 * half, seed=seed, max_doc_tokens=mdt, parts=2)
    head = take(first, cut)
    resumed = PackedStream(src, n_ranks, 2 * half, seed=seed, max_doc_tokens=mdt, parts=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same_batches(two, head + take(resumed, n_batches - cut))
    with pytest.raises(DataError, match="parts"):
        PackedStream(src, n_ranks, 2 * half, seed=seed, max_doc_tokens=mdt).load_state_dict(first.state_dict())


def test_two_part_stream_rejects_odd_budgets():
    with pytest.raises(DataError, match=r"tokens_per_rank \(5\) must divide into 2 equal parts"):
        PackedStream(ListSource([3]), 1, 5, parts=2)
    with pytest.raises(DataError, match="parts"):
        PackedStream(ListSource([3]), 1, 4, parts=3)
