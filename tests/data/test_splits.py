"""Tests of tumorseg/data/splits.py: patient splits, folds, fold columns, split files and the data fingerprint."""

import shutil
from pathlib import Path

import pytest

import dataset
from dataset import load_dataset
from tumorseg.data.checks import group_labels, verify_dataset
from tumorseg.data.splits import (Split, data_fingerprint, fold_split_lists, read_split_file, split_indices,
                                  three_way_split)


def test_grouped_split_keeps_groups_apart_and_is_reproducible():
    groups = [f"g{i // 5}" for i in range(100)]
    train, val = split_indices(100, 0.2, seed=3, groups=groups)
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert sorted(train + val) == list(range(100)) and len(val) == 20
    assert (train, val) == split_indices(100, 0.2, seed=3, groups=groups)
    assert (train, val) != split_indices(100, 0.2, seed=4, groups=groups)
    random_train, random_val = split_indices(100, 0.2, seed=3)
    assert len(random_val) == 20 and not set(random_train) & set(random_val)
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_indices(10, 0.2, seed=0, groups=["a"] * 10)


@pytest.mark.parametrize("count, fraction, groups, words", [
    (1, 0.2, None, "train/validation split needs at least 2 images in data, found 1"),
    (0, 0.2, None, "needs at least 2 images in data, found 0"),
    (3, 0.9, None, "VAL_FRACTION 0.9 of 3 images in data puts all of them in validation and leaves no training "
                   "image; use at least 10 images or a smaller VAL_FRACTION"),
    (4, 0.2, ["a"] * 4, "grouped split needs at least 2 groups in column 'patient_id' of data/metadata.csv, found 1"),
    (6, 0.7, list("aabbcc"), "VAL_FRACTION 0.7 of 3 groups in column 'patient_id' of data/metadata.csv puts all of "
                             "them in validation and leaves no training group; use at least 4 groups"),
    (10, 1.0, None, "VAL_FRACTION must lie strictly between 0 and 1, got 1.0"),
])
def test_impossible_splits_are_explained_in_plain_words(count, fraction, groups, words):
    with pytest.raises(ValueError) as error:
        split_indices(count, fraction, seed=0, groups=groups, group_column="patient_id", root=Path("data"))
    assert words in str(error.value)


def test_every_split_either_has_both_sides_or_is_refused_before_scikit_learn():
    for count in range(1, 13):
        for fraction in (0.01, 0.1, 0.2, 0.5, 0.67, 0.9):
            for groups in (None, [str(i // 2) for i in range(count)]):
                try:
                    train, val = split_indices(count, fraction, seed=0, groups=groups)
                except ValueError as error:  # ours, not scikit-learn's "Adjust any of the aforementioned ..."
                    assert "VAL_FRACTION" in str(error) or "needs at least 2" in str(error)
                    continue
                assert train and val and sorted(train + val) == list(range(count))


def test_one_pair_is_refused_at_split_time(demo_copy):
    for sub in ("images", "masks"):
        for path in sorted((demo_copy / sub).iterdir())[1:]:
            path.unlink()
    data = load_dataset(demo_copy, image_size=32, in_channels=1)
    with pytest.raises(ValueError, match=f"needs at least 2 images in {demo_copy}, found 1"):
        split_indices(len(data.pairs), 0.2, seed=0, root=demo_copy)


def assert_patients_apart(split: Split, groups: list[str]) -> None:
    """No patient in two of training, inner validation and held-out; every image in one of them."""
    sets = [{groups[i] for i in indices} for indices in (split.train, split.val, split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(split.train + split.val + split.test) == list(range(len(groups)))


def test_real_data_passes_integrity_and_splits_by_patient(real_root):
    assert verify_dataset(real_root, "patient_id") == []
    data = load_dataset(real_root, image_size=64, in_channels=1, group_column="patient_id")
    assert len(data.pairs) == len(list((real_root / "images").iterdir()))
    single = three_way_split(len(data.pairs), 0.2, 0.2, seed=42, groups=data.groups)
    assert_patients_apart(single, data.groups)
    assert 0.1 < len(single.test) / len(data.pairs) < 0.3 and 0.1 < len(single.val) / len(data.pairs) < 0.3
    held_out = []
    for fold in range(5):
        split = three_way_split(len(data.pairs), 0.2, 0.0, seed=42, folds=5, fold=fold, groups=data.groups)
        assert_patients_apart(split, data.groups)
        held_out += split.test
    assert sorted(held_out) == list(range(len(data.pairs)))  # every slice held out exactly once over the folds
    # Tumours are small: mean foreground share is a few percent at most.
    assert 0.002 < data.masks.mean() < 0.05


def test_a_tiny_set_whose_held_out_share_takes_a_patient_says_so():
    with pytest.raises(ValueError) as caught:
        three_way_split(2, 0.2, 0.2, seed=0, groups=["p1", "p2"], group_column="patient_id")
    message = str(caught.value)
    assert message.startswith("grouped split needs at least 2 groups in column 'patient_id', found 1")
    assert "the held-out share (--test-fraction 0.2) took 1 of the 2 groups first and left 1" in message
    assert "a smaller --test-fraction" in message
    with pytest.raises(ValueError, match="--folds 2.*took 1 of the 2 groups first.*more --folds"):
        three_way_split(2, 0.2, 0.0, seed=0, folds=2, fold=0, groups=["p1", "p2"])


def test_three_way_split_draws_validation_from_the_other_folds_only():
    groups = [f"p{i // 4}" for i in range(80)]
    for fold in range(4):
        split = three_way_split(80, 0.25, 0.0, seed=1, folds=4, fold=fold, groups=groups)
        assert_patients_apart(split, groups)
        assert len({groups[i] for i in split.test}) == 5 and len({groups[i] for i in split.val}) == 4
    plain = three_way_split(80, 0.25, 0.2, seed=1, groups=groups)
    assert_patients_apart(plain, groups)
    assert len({groups[i] for i in plain.test}) == 4 and plain == three_way_split(80, 0.25, 0.2, 1, groups=groups)
    assert three_way_split(80, 0.25, 0.0, seed=1, groups=groups).test == []
    with pytest.raises(ValueError, match="TEST_FRACTION 0.99"):
        three_way_split(80, 0.25, 0.99, seed=1, groups=groups)


def test_fold_column_serves_as_the_folds_and_names_a_patient_in_two_folds():
    groups = [f"p{i // 4}" for i in range(40)]
    labels = [str(1 + (i // 4) % 5) for i in range(40)]  # patients 0, 5 in fold 1; 1, 6 in fold 2 ...
    split = three_way_split(40, 0.25, 0.0, seed=0, fold=1, groups=groups, fold_labels=labels, fold_column="fold")
    assert {labels[i] for i in split.test} == {"2"}
    assert_patients_apart(split, groups)
    labels[5] = "4"  # patient p1's second slice moves to fold 4
    with pytest.raises(ValueError, match=r"1 group\(s\) have images in two or more folds.*p1 in folds 2, 4"):
        three_way_split(40, 0.25, 0.0, seed=0, fold=0, groups=groups, fold_labels=labels, fold_column="fold")
    with pytest.raises(ValueError, match="choose FOLD 0 to 4"):
        three_way_split(40, 0.25, 0.0, seed=0, fold=5, fold_labels=[str(1 + i % 5) for i in range(40)])


def test_the_release_folds_put_patients_in_two_folds_and_are_refused(real_root):
    """The shared set's `fold` column (the release's own) counts repeat studies apart: refused, patients named."""
    data = load_dataset(real_root, image_size=16, in_channels=1, group_column="patient_id")
    labels, problems = group_labels(real_root, "fold", data.pairs)
    assert problems == []
    folds_of: dict[str, set[str]] = {}
    for group, label in zip(data.groups, labels, strict=True):
        folds_of.setdefault(group, set()).add(label)
    crossing = sorted(group for group, found in folds_of.items() if len(found) > 1)
    assert len(crossing) >= 10  # 15 of the release's 209 patients; those of them in the shared subset
    with pytest.raises(ValueError, match=rf"{len(crossing)} group\(s\) have images in two or more folds") as error:
        three_way_split(len(data.pairs), 0.2, 0.0, 42, fold=0, groups=data.groups, fold_labels=labels,
                        fold_column="fold")
    assert all(f"{group} in folds " in str(error.value) for group in crossing)


def test_a_split_file_is_refused_where_it_no_longer_describes_the_data(tmp_path):
    import json
    stems = ["a1", "a2", "b1", "b2", "c1"]
    groups = ["a", "a", "b", "b", "c"]
    path = tmp_path / "splits.json"

    def refusal(entry: dict, fold: int = 0) -> str:
        path.write_text(json.dumps({"folds": [entry]}))
        with pytest.raises(ValueError) as error:
            read_split_file(path, fold, stems, groups)
        return str(error.value)

    good = {"train": ["a1", "a2"], "val": ["b1", "b2"], "test": ["c1"]}
    path.write_text(json.dumps({"folds": [good]}))
    split = read_split_file(path, 0, stems, groups)
    assert (split.train, split.val, split.test) == ([0, 1], [2, 3], [4])
    assert "FOLD 3: the file has 1 folds" in refusal(good, fold=3)
    assert "1 listed images are not in the data: z9" in refusal({**good, "test": ["c1", "z9"]})
    assert "1 images of the data are in no role: c1" in refusal({**good, "test": []})
    assert "1 images are listed twice: a1" in refusal({**good, "val": ["b1", "b2", "a1"]})
    assert "1 groups sit in two roles: b" in refusal({"train": ["a1", "a2", "b1"], "val": ["b2"], "test": ["c1"]})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable split file"):
        read_split_file(path, 0, stems, groups)


def test_fold_split_lists_are_the_folds_train_py_makes(demo_root):
    lists = fold_split_lists(demo_root, 3, "", "patient_id", 42, 0.2)
    data = dataset.load_dataset(demo_root, 32, 1, "patient_id")
    for fold, entry in enumerate(lists):
        split = three_way_split(len(data.pairs), 0.2, 0.0, 42, 3, fold, data.groups, None, "patient_id")
        assert entry == {role: [data.pairs[i].stem for i in getattr(split, role)] for role in ("train", "val", "test")}
    assert sorted(s for entry in lists for s in entry["test"]) == [p.stem for p in data.pairs]


def test_the_data_fingerprint_changes_with_a_file_or_the_metadata(demo_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_root, copy)
    assert data_fingerprint(copy) == data_fingerprint(demo_root)
    (copy / "metadata.csv").write_text((copy / "metadata.csv").read_text() + "\n")
    changed = data_fingerprint(copy)
    assert changed["sha256"] != data_fingerprint(demo_root)["sha256"] and changed["pairs"] == 24
    next((copy / "masks").iterdir()).unlink()
    assert data_fingerprint(copy)["pairs"] == 23
