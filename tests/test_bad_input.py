"""Bad input at the edges (issue 16, "CLI and loaders"): every one is a one-line error that names the field, exit
code 2 from the CLI, never a traceback, a MemoryError or a RecursionError; lengths are capped at 2**31 tokens per
document so int64 pair counts cannot overflow. The CLI runs in-process through ``main`` (the real parser and
planner), plus one real subprocess for the end-to-end exit code."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from distca.cli import main
from distca.config import SchedulerSection, load_config
from distca.data import DataError, sample_lengths
from distca.data.distributions import LengthDistribution
from distca.data.stream import PackedStream
from distca.data.synthetic_source import SyntheticSource
from distca.data.text_source import TextSource
from distca.data.token_files import TokenFileSource, token_file_paths, write_token_file
from distca.errors import ConfigError, InputError
from distca.limits import MAX_DOC_TOKENS
from distca.scheduler import BatchLayout, SchedulerConfig
from distca.scheduler.summary import plan_summary

ROOT = Path(__file__).parent.parent
DEEP = "[" * 100_000 + "]" * 100_000  # JSON (and YAML flow) nested 100k deep


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``distca *argv`` in this process: (exit code, stdout, stderr). argparse's own errors exit via SystemExit."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, prog: str, *names: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def good_lengths(tmp_path: Path) -> Path:
    path = tmp_path / "good.json"
    path.write_text("[[100, 200], [300]]")
    return path


# ------------------------------------------------------------------------------------------------------------------
# distca plan: the lengths file
# ------------------------------------------------------------------------------------------------------------------

BAD_LENGTHS = {
    "ranks is a number": ('{"ranks": 5}', "ranks must be a list"),
    "continues is a number": ('{"ranks": [[4, 4], [4]], "continues": 7}', "continues must be a list"),
    "continues holds a number": ('{"ranks": [[4], [4]], "continues": [false, 1]}', "continues[1] must be true or"),
    "length 1e30 as a float": ("[[1e30, 5]]", "positive integers"),
    "length 10**30 as an integer": (f"[[{10**30}, 5]]", "exceeds the cap of 2**31"),
    "length 2**62": (f"[[{2**62}, {2**62}]]", "exceeds the cap of 2**31"),
    "length 2**31 + 1": (f"[[{2**31 + 1}]]", "exceeds the cap of 2**31"),
    "nested 100k deep": (DEEP, "nested too deeply"),
    "a 5000-digit integer": (f"[[{'9' * 5000}]]", "not valid JSON"),
    "not JSON": ("[[1, 2]", "not valid JSON"),
    "a string": ('"abc"', "expected a list of per-rank lists"),
    "unknown key": ('{"ranks": [[1]], "extra": 1}', "expected keys 'ranks'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LENGTHS))
def test_plan_rejects_a_bad_lengths_file_in_one_line(capsys, tmp_path, case):
    text, match = BAD_LENGTHS[case]
    path = tmp_path / "lengths.json"
    path.write_text(text)
    rc, out, err = _cli(capsys, "plan", "--lengths", str(path), "--servers", "2")
    line = _one_line_error(rc, err, "distca plan", "--lengths", match)
    assert out == "" and len(line) < 400


def test_plan_rejects_unreadable_lengths_files(capsys, tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[[1]]")
    for path, match in ((tmp_path / "missing.json", "cannot read"), (binary, "not UTF-8")):
        rc, _, err = _cli(capsys, "plan", "--lengths", str(path), "--servers", "2")
        _one_line_error(rc, err, "distca plan", "--lengths", match)


# ------------------------------------------------------------------------------------------------------------------
# distca plan: the flags
# ------------------------------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--kv-heads", "0"], "--kv-heads must be in [1,"),
    (["--heads", "0"], "--heads must be in [1,"),
    (["--head-dim", "0"], "--head-dim must be in [1,"),
    (["--dtype-bytes", "0"], "--dtype-bytes must be in [1,"),
    (["--heads", "-32"], "--heads must be in [1,"),
    (["--heads", "32", "--kv-heads", "5"], "--heads (32) must be a multiple of --kv-heads (5)"),
    (["--heads", "4096", "--head-dim", "4096"], "bytes per token exceeds"),
    (["--eps", "nan"], "--eps must be a finite number, got nan"),
    (["--eps", "inf"], "--eps must be a finite number, got inf"),
    (["--eps", "-0.5"], "--eps must be in [0,"),
    (["--servers", "0"], "--servers must be in [1,"),
    (["--servers", str(2**40)], "--servers must be in [1, 2**20]"),
    (["--granularity", "0"], "--granularity must be in [1, 2**31]"),
    (["--window", "0"], "--window must be in [1, 2**31] or -1"),
    (["--devices-per-node", "-1"], "--devices-per-node must be in [0,"),
    (["--devices-per-node", "2", "--placement", "dedicated"], "--devices-per-node describes the in-place data plane"),
]


@pytest.mark.parametrize(("flags", "match"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_plan_rejects_bad_flags_naming_the_flag(capsys, good_lengths, flags, match):
    argv = ["plan", "--lengths", str(good_lengths), "--servers", "2"]
    rc, out, err = _cli(capsys, *argv, *flags)
    _one_line_error(rc, err, "distca plan", match)
    assert out == ""


def test_plan_takes_a_mask_family_and_refuses_a_bad_one_naming_the_flag(capsys, good_lengths):
    rc, out, err = _cli(capsys, "plan", "--lengths", str(good_lengths), "--servers", "2", "--mask", "prefix_lm:50",
                        "--json")
    assert rc == 0, err
    # each document: the 50-token prefix sees all 50 prefix keys, the rest is causal
    total = sum(50 * 50 + n * (n + 1) // 2 - 50 * 51 // 2 for n in (100, 200, 300))
    summary = json.loads(out)
    assert summary["max_server_pairs"] * 2 >= total and summary["max_server_pairs"] <= summary["capacity_pairs"]
    for flags, match in ((["--mask", "dilated:3"], "--mask"), (["--mask", "window:0"], "--mask"),
                         (["--mask", "causal", "--window", "8"], "--mask or --window")):
        rc, out, err = _cli(capsys, "plan", "--lengths", str(good_lengths), "--servers", "2", *flags)
        _one_line_error(rc, err, "distca plan", match)


def test_plan_reports_the_key_relay_between_nodes(capsys, tmp_path):
    """``--devices-per-node``: the key/value bytes of the plan that cross nodes, sent directly and relayed once per
    node. One long document over four ranks in two nodes of two: both servers of a node need the other node's keys."""
    path = tmp_path / "one-doc.json"
    path.write_text(json.dumps({"ranks": [[1024]] * 4, "continues": [False, True, True, True]}))
    argv = ["plan", "--lengths", str(path), "--servers", "4", "--heads", "8", "--kv-heads", "2", "--json"]
    rc, out, err = _cli(capsys, *argv, "--devices-per-node", "2")
    assert rc == 0, err
    s = json.loads(out)
    assert s["devices_per_node"] == 2 and s["relay_routes"] > 0
    assert 0 < s["inter_node_kv_bytes_relayed"] < s["inter_node_kv_bytes_direct"]
    rc, out, err = _cli(capsys, *argv, "--devices-per-node", "4")  # one node: nothing crosses
    s = json.loads(out)
    assert s["relay_routes"] == 0 and s["inter_node_kv_bytes_direct"] == s["inter_node_kv_bytes_relayed"] == 0
    rc, out, err = _cli(capsys, *argv)
    assert "relay_routes" not in json.loads(out)


def test_plan_takes_eps_zero_and_a_huge_finite_eps(capsys, good_lengths):
    for eps in ("0", "1e300", "1e308"):  # (1 + 1e308) * total overflows to inf
        rc, out, err = _cli(capsys, "plan", "--lengths", str(good_lengths), "--servers", "2", "--eps", eps, "--json")
        assert rc == 0, err
        summary = json.loads(out)
        total = 100 * 101 // 2 + 200 * 201 // 2 + 300 * 301 // 2
        assert summary["max_server_pairs"] <= summary["capacity_pairs"] <= total


@pytest.mark.parametrize("argv", [["plan", "--lengths", "x.json", "--servers", "two"],
                                  ["plan", "--lengths", "x.json", "--servers", "2", "--eps", "abc"],
                                  ["train", "--run-steps", "abc"],
                                  ["plan", "--servers", "2"],
                                  ["nosuchcommand"]],
                         ids=["int flag", "float flag", "train flag", "missing flag", "command"])
def test_typed_flag_errors_are_one_line(capsys, argv):
    rc, out, err = _cli(capsys, *argv)
    line = _one_line_error(rc, err, err.split(": error: ")[0])
    assert line.startswith("distca") and "usage:" not in err and out == ""


def test_the_cli_process_exits_2_without_a_traceback(tmp_path):
    """End to end, as a user runs it: the audit's RecursionError is one line and exit code 2."""
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    r = subprocess.run([sys.executable, "-m", "distca.cli", "plan", "--servers", "2", "--lengths", str(deep)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.startswith("distca plan: error: --lengths")


# ------------------------------------------------------------------------------------------------------------------
# the 2**31 cap: scheduler input, config, data loaders
# ------------------------------------------------------------------------------------------------------------------


def test_lengths_are_capped_at_2_31_per_document_so_pair_counts_stay_exact():
    """2**62 used to be accepted and planned with an int64 pair count that had wrapped around."""
    with pytest.raises(InputError, match="exceeds the cap of 2\\*\\*31"):
        BatchLayout.from_ranks([[2**62, 2**62]])
    with pytest.raises(InputError, match="exceeds the cap"):
        BatchLayout.from_ranks([[MAX_DOC_TOKENS + 1]])
    with pytest.raises(InputError, match="continues reaches 2147483649 tokens"):
        BatchLayout.from_ranks([[MAX_DOC_TOKENS], [1]], [False, True])
    with pytest.raises(InputError, match="over the cap of 2\\*\\*62"):  # each document fits, their pairs do not
        BatchLayout.from_ranks([[MAX_DOC_TOKENS] * 2, [MAX_DOC_TOKENS] * 2])
    # At the cap a plan is exact: every pair counted once, no wrap-around.
    batch = BatchLayout.from_ranks([[MAX_DOC_TOKENS], [2**30, 2**30]])
    summary = plan_summary(batch, 2, SchedulerConfig(eps=0.0, granularity=128, window=-1))
    pairs = MAX_DOC_TOKENS * (MAX_DOC_TOKENS + 1) // 2 + 2 * (2**30 * (2**30 + 1) // 2)
    assert summary["mean_server_pairs"] * 2 == pytest.approx(pairs, rel=1e-12)
    assert pairs / 2 <= summary["max_server_pairs"] <= pairs / 2 + MAX_DOC_TOKENS


def test_scheduler_config_needs_a_finite_eps_and_capped_sizes():
    for eps in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="eps must be >= 0 and finite"):
            SchedulerConfig(eps=eps, granularity=128, window=-1)
    with pytest.raises(InputError, match="window must be in"):
        SchedulerConfig(eps=0.0, granularity=128, window=2**40)
    SchedulerConfig(eps=0.0, granularity=128, window=-1)  # eps = 0 stays allowed


def test_distributions_and_stream_are_capped():
    with pytest.raises(DataError, match="over the cap of 2\\*\\*31"):
        sample_lengths("fixed", n_docs=2, length=2**62)
    with pytest.raises(DataError, match="stretches 'pretrain' lengths"):
        LengthDistribution("pretrain", elongate=1e300)
    with pytest.raises(DataError, match="finite"):
        sample_lengths("pretrain", n_docs=2, sigma=float("inf"))
    source = SyntheticSource(LengthDistribution("fixed", params={"length": 8}), n_docs=4, vocab_size=16)
    with pytest.raises(DataError, match="tokens_per_rank must be in \\[1, 2\\*\\*31\\]"):
        PackedStream(source, n_ranks=2, tokens_per_rank=2**40)
    with pytest.raises(DataError, match=r"max_doc_tokens .* must be in"):
        PackedStream(source, n_ranks=2, tokens_per_rank=8, max_doc_tokens=2**62)


# ------------------------------------------------------------------------------------------------------------------
# config: YAML and --section.key overrides
# ------------------------------------------------------------------------------------------------------------------

BAD_OVERRIDES = [
    (["--scheduler.eps", ".nan"], "scheduler.eps must be a finite number"),
    (["--scheduler.eps", ".inf"], "scheduler.eps must be a finite number"),
    (["--train.lr", "-.inf"], "train.lr must be a finite number"),
    (["--model.n_heads", "0"], "model.n_heads must be >= 1"),
    (["--model.n_kv_heads", "0"], "model.n_kv_heads must be >= 1"),
    (["--model.hidden", str(2**40)], "model.hidden must be <= 2**20"),
    (["--model.n_layers", str(10**30)], "model.n_layers must fit in 64 bits"),
    (["--data.doc_lengths", f"[{2**62}]"], "data.doc_lengths[0] = 4611686018427387904 exceeds the cap of 2**31"),
    (["--data.doc_lengths", f"[{2**31}, {2**31}, {2**31}, {2**31}]"], "data.doc_lengths attend more than 2**62"),
    (["--data.max_len", str(2**40)], "data.max_len must be <= 2**31"),
    (["--attention.window", str(2**40)], "attention.window must be -1 or >= 1"),
    (["--train.tokens_per_rank", str(2**40)], "train.tokens_per_rank must be <= 2**31"),
    (["--cluster.n_servers", str(2**40)], "cluster.n_servers must be in [1, 2**20]"),
    (["--model.n_layers", DEEP], "override --model.n_layers: YAML nested deeper than 64 levels"),
    (["--model.rope_scaling.type", "[[[[[1]]]]]"], "model.rope_scaling.type must be one of"),
    (["--" + ".".join(["a"] * 1000), "1"], "a key has at most 8 dotted parts"),
    (["--model.n_layers", ": : :"], "override --model.n_layers: cannot parse"),
    (["--run-steps", "-3"], "--run-steps must be in [0,"),
]


@pytest.mark.parametrize(("args", "match"), BAD_OVERRIDES, ids=[a[0][:40] for a, _ in BAD_OVERRIDES])
def test_config_overrides_are_validated_in_one_line(capsys, args, match):
    command = "train" if args[0] == "--run-steps" else "config"
    rc, out, err = _cli(capsys, command, *args)
    _one_line_error(rc, err, "distca", match)
    assert out == ""


def test_config_file_nested_deep_is_one_error(capsys, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + DEEP)
    rc, _, err = _cli(capsys, "config", "--config", str(path))
    _one_line_error(rc, err, "distca", "deep.yaml: YAML nested deeper than 64 levels")
    path.write_text("".join(" " * i + f"k{i}:\n" for i in range(3000)))  # block style: the composer's recursion
    rc, _, err = _cli(capsys, "config", "--config", str(path))
    _one_line_error(rc, err, "distca", "deep.yaml: YAML nested too deeply")
    path.write_text("1: 2\nzz: 3\n")  # a non-string key is named, not a TypeError from sorting int and str
    rc, _, err = _cli(capsys, "config", "--config", str(path))
    _one_line_error(rc, err, "distca", "unknown config key 1")


def test_scheduler_eps_zero_stays_allowed():
    assert load_config(None, ["--scheduler.eps", "0"]).scheduler.eps == 0.0
    with pytest.raises(ConfigError, match="finite"):
        SchedulerSection(eps=float("nan"))


# ------------------------------------------------------------------------------------------------------------------
# data loaders: token files and jsonl
# ------------------------------------------------------------------------------------------------------------------


def _claim_entries(npy: Path, n: int) -> None:
    """Rewrite ``npy``'s header to claim ``n`` entries, leaving its data (and size) as it was."""
    raw = npy.read_bytes()
    head_len = int.from_bytes(raw[8:10], "little")
    head = raw[10:10 + head_len].decode("latin1")
    start, end = head.index("'shape': (") + len("'shape': ("), head.index(",)")
    new = (head[:start] + str(n) + head[end:]).rstrip()
    assert len(new) < head_len
    npy.write_bytes(raw[:10] + (new.ljust(head_len - 1) + "\n").encode("latin1") + raw[10 + head_len:])


@pytest.mark.parametrize("claimed", [10**9, 10**11])
def test_offsets_header_is_checked_against_the_file_size_before_allocating(tmp_path, claimed):
    """A header claiming 10**9 entries used to allocate 8 GB (MemoryError under a memory limit); 10**11 always."""
    write_token_file(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    meta_path = token_file_paths(tmp_path / "ds")[2]
    meta = json.loads(meta_path.read_text())
    meta["n_docs"] = claimed - 1  # the metadata agrees with the header: only the file size can tell
    meta_path.write_text(json.dumps(meta))
    _claim_entries(token_file_paths(tmp_path / "ds")[1], claimed)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"header promises {claimed} int64 offsets .* holds 24 bytes"):
            TokenFileSource(tmp_path / "ds")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing sized from the header was allocated


def test_token_files_cap_documents_and_deep_metadata(tmp_path):
    write_token_file(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    _, off_path, meta_path = token_file_paths(tmp_path / "ds")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(DEEP)
    with pytest.raises(DataError, match=r"ds\.meta\.json is not readable: JSON nested too deeply"):
        TokenFileSource(tmp_path / "ds")
    # A document over the cap: offsets [0, 2**31 + 1, 2**31 + 3] (refused before the tokens file is opened).
    n = MAX_DOC_TOKENS + 3
    np.save(off_path, np.array([0, MAX_DOC_TOKENS + 1, n], dtype=np.int64))
    meta.update(dtype="uint8", n_tokens=n)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="document 0 holds 2147483649 tokens, over the cap of 2\\*\\*31"):
        TokenFileSource(tmp_path / "ds")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(["the cat sat"], trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_deeply_nested_jsonl_line_is_a_data_error_naming_the_line(tmp_path, tokenizer_json):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "the cat"}\n' + '{"meta": ' + DEEP + ', "text": "sat"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:2: JSON nested too deeply"):
        TextSource(path, tokenizer_json)


# ------------------------------------------------------------------------------------------------------------------
# seeded fuzz: random lengths files, flags and overrides never escape as anything but exit 0 or one line + exit 2
# ------------------------------------------------------------------------------------------------------------------

_ODD = [0, 1, -1, 5, 300, 2**31, 2**31 + 1, 2**62, 10**30, 1e30, 3.5, float("nan"), True, False, None, "7", ""]


def _random_lengths(rng: random.Random) -> object:
    """Mostly well-formed lengths (so some plans succeed) with odd values, types and keys mixed in."""
    if rng.random() < 0.1:
        return rng.choice([*_ODD, {"ranks": 5}, [[[[1]]]], {}])
    odd = rng.random() < 0.5  # half the files carry a few odd pieces, ranks or flags

    def piece() -> object:
        return rng.choice(_ODD) if odd and rng.random() < 0.1 else rng.randint(1, 4096)

    ranks = [[piece() for _ in range(rng.randint(0, 4))] if not odd or rng.random() > 0.05 else rng.choice(_ODD)
             for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.7:
        return ranks
    flags = [False] + [rng.random() < 0.5 for _ in ranks[1:]]
    if odd:
        flags = rng.choice([flags, flags[:-1], [True, *flags[1:]], [7] * len(flags), 7, None])
    return {"ranks": ranks, "continues": flags, **({"extra": 1} if odd and rng.random() < 0.1 else {})}


def _exits_cleanly(capsys, argv: list[str]) -> int:
    rc, out, err = _cli(capsys, *argv)
    assert rc in (0, 2), (argv, err)
    assert (rc == 0 and out and not err) or (rc == 2 and len(err.strip().splitlines()) == 1 and not out), (argv, err)
    return rc


def test_seeded_fuzz_of_plan_and_config(capsys, tmp_path):
    rng = random.Random(16)
    path = tmp_path / "lengths.json"
    codes = []
    for _ in range(200):
        path.write_text(json.dumps(_random_lengths(rng)))
        flags = {"--servers": ["1", "3", "0"], "--eps": ["0", "0.02", "nan", "-1", "1e308"],
                 "--window": ["-1", "64", "0", str(2**31 + 1)], "--heads": ["32", "0", "7"],
                 "--kv-heads": ["8", "0"], "--placement": ["colocated", "dedicated"]}
        argv = ["plan", "--lengths", str(path), "--json"]
        for flag, choices in flags.items():
            argv += [flag, choices[0] if rng.random() < 0.9 else rng.choice(choices)]
        codes.append(_exits_cleanly(capsys, argv))
    keys = ["model.n_heads", "model.rope_theta", "model.layer_windows", "model.rope_scaling.type", "attention.window",
            "data.doc_lengths", "data.elongate", "cluster.n_servers", "scheduler.eps", "train.lr", "seed", "model"]
    values = ["0", "2", ".nan", "-.inf", "1.0e30", str(2**31 + 1), str(10**30), "[1, 2]", "{a: 1}", "null", "'x'",
              "&a [*a]", "[" * 70 + "]" * 70, ": :", "!!python/object:os.system x"]
    for _ in range(200):
        argv = ["config"]
        for _ in range(rng.randint(1, 3)):
            argv += ["--" + rng.choice(keys), rng.choice(values)]
        codes.append(_exits_cleanly(capsys, argv))
    assert 0 < codes.count(0) < len(codes)  # both outcomes happen: the fuzz reaches the planner and the config
