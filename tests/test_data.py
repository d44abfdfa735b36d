import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scalerec.data import DataError, build_dataset, load_dataset, read_interactions
from scalerec.data.batching import iterate_batches, pad_left


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_user_seq_reader_and_loo_split(tmp_path):
    path = write(tmp_path, "seq.txt", "10 5 7 9 11\n20 7 8 5\n30 5 8\n")
    ds = load_dataset(path)
    # items remapped in order of first appearance: 5->1, 7->2, 9->3, 11->4, 8->5
    assert ds.num_items == 5
    assert list(ds.item_ids) == [5, 7, 9, 11, 8]
    assert [s.tolist() for s in ds.train] == [[1, 2], [2], [1, 5]]
    assert ds.valid.targets.tolist() == [3, 5]
    assert ds.test.targets.tolist() == [4, 1]
    assert [x.tolist() for x in ds.test.inputs] == [[1, 2, 3], [2, 5]]
    assert [x.tolist() for x in ds.valid.inputs] == [[1, 2], [2]]
    # user 30 has two interactions: kept for training, counted, not evaluated
    assert ds.stats["users_too_short"] == 1
    assert len(ds.test) == 2


def test_user_item_reader(tmp_path):
    path = write(tmp_path, "ui.txt", "1 100\n1 200\n1 300\n2 200\n2 100\n2 300\n")
    inter = read_interactions(path)
    assert not inter.has_timestamps
    ds = build_dataset(inter)
    assert list(ds.test.targets) == [3, 3]
    assert [list(s) for s in ds.train] == [[1], [2]]


def test_movielens_reader_sorts_by_time(tmp_path):
    path = write(tmp_path, "u.data", "1\t10\t5\t300\n1\t11\t3\t100\n1\t12\t4\t200\n1\t13\t4\t400\n")
    inter = read_interactions(path)
    assert inter.has_timestamps
    ds = build_dataset(inter)
    order = [ds.item_ids[i - 1] for i in list(ds.train[0]) + [ds.valid.targets[0], ds.test.targets[0]]]
    assert order == [11, 12, 10, 13]


def test_csv_and_parquet_readers(tmp_path):
    csv = write(tmp_path, "x.csv", "user,item,timestamp\n1,5,3\n1,6,1\n1,7,2\n")
    a = read_interactions(csv)
    assert list(a.items) == [5, 6, 7] and list(a.timestamps) == [3, 1, 2]
    pq.write_table(pa.table({"user": [1, 1], "item": [9, 8]}), tmp_path / "x.parquet")
    b = read_interactions(str(tmp_path / "x.parquet"))
    assert list(b.items) == [9, 8] and not b.has_timestamps
    bad = write(tmp_path, "bad.csv", "user,product\n1,2\n")
    with pytest.raises(DataError, match="missing column"):
        read_interactions(bad)


def test_temporal_split(tmp_path):
    # users 1, 2 finish before the cut; user 3 has interactions after it
    rows = ["1\t1\t1\t1", "1\t2\t1\t2", "2\t2\t1\t3", "2\t3\t1\t4", "3\t1\t1\t5", "3\t2\t1\t6", "3\t3\t1\t7",
            "3\t4\t1\t100", "3\t5\t1\t101"]
    path = write(tmp_path, "u.data", "\n".join(rows) + "\n")
    ds = build_dataset(read_interactions(path), split="temporal", temporal_quantile=0.8)
    cut = ds.stats["temporal_cut"]
    assert 7 < cut < 101
    assert len(ds.train) == 2  # only users without post-cut interactions train
    to_orig = lambda i: int(ds.item_ids[i - 1])
    assert to_orig(ds.test.targets[0]) == 5 and to_orig(ds.valid.targets[0]) == 4
    assert [to_orig(i) for i in ds.test.inputs[0]] == [1, 2, 3, 4]


def test_min_count_filtering(tmp_path):
    lines = [f"{u} 1 2 {100 + u}" for u in range(1, 7)]  # items 1, 2 have 6 users; 101..106 have 1
    ds = build_dataset(read_interactions(write(tmp_path, "s.txt", "\n".join(lines) + "\n")), min_item_count=5)
    assert ds.num_items == 2
    assert ds.stats["filtered_interactions"] == 6


@pytest.mark.parametrize(
    "text,match",
    [("1 2 x3\n", r"seq.txt:1: item id 'x3' is not an integer"), ("", "empty"), ("1 2\n3\n", r"seq.txt:2")],
)
def test_bad_input_names_file_and_line(tmp_path, text, match):
    path = write(tmp_path, "seq.txt", text)
    with pytest.raises(DataError, match=match):
        load_dataset(path, fmt="user_seq" if text else None)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_dataset("nope.txt")


def test_real_beauty_counts(beauty_path):
    ds = load_dataset(beauty_path)
    info = ds.describe()
    assert (info["users"], info["items"], info["interactions"]) == (22363, 12101, 198502)
    assert len(ds.test) == 22363
    assert sum(len(s) for s in ds.train) + 2 * len(ds.test) == 198502


def test_real_movielens(ml100k_path):
    ds = load_dataset(ml100k_path, split="temporal")
    info = ds.describe()
    assert (info["users"], info["items"], info["interactions"]) == (943, 1682, 100000)
    assert len(ds.test) > 0 and len(ds.train) + len(ds.test) == 943


def test_batches_truncate_left_and_pad():
    seqs = [np.arange(1, 8), np.array([3, 4])]
    out = pad_left(seqs, 4, trim=False)
    assert out.tolist() == [[4, 5, 6, 7], [0, 0, 3, 4]]
    (x, y), = list(iterate_batches(seqs, 8, 4, np.random.default_rng(0), shuffle=False))
    assert x.tolist() == [[3, 4, 5, 6], [0, 0, 0, 3]]
    assert y.tolist() == [[4, 5, 6, 7], [0, 0, 0, 4]]
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(seqs, 0, 4, np.random.default_rng(0)))
