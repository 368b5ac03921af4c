"""The committed split on the real BUSI folder: complete, leakage-free, stratified, reproducible."""

from __future__ import annotations

import csv
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from kdcore.config import CLASS_NAMES, DEFAULT_SPLIT_FILE
from kdcore.data import (
    NEAR_DUPLICATE_DISTANCE,
    DataIntegrityError,
    ImageRecord,
    build_split_records,
    cross_validation_folds,
    find_mismatches,
    folder_records,
    mixed_label_groups,
    near_duplicate_groups,
    pairwise_hamming,
    perceptual_hashes,
    read_manifest,
    read_split_file,
    records_in,
    verify_files,
    write_split_file,
)

USED = ("train", "val", "test")


@pytest.fixture(scope="module")
def split() -> list[ImageRecord]:
    return read_split_file(DEFAULT_SPLIT_FILE)


@pytest.fixture(scope="module")
def manifest(busi_dir) -> list[ImageRecord]:
    return read_manifest(busi_dir)


@pytest.fixture(scope="module")
def hashes(busi_dir, manifest) -> np.ndarray:
    return perceptual_hashes(busi_dir, manifest)


def test_split_file_lists_every_manifest_image_once_with_its_sha256(split, manifest):
    assert len(manifest) == 780
    files = [r.file for r in split]
    assert len(files) == len(set(files)), "a file appears twice in the split file"
    assert set(files) == {r.file for r in manifest}
    by_file = {r.file: r for r in split}
    for rec in manifest:
        assert by_file[rec.file].sha256 == rec.sha256, rec.file
        assert by_file[rec.file].label == rec.label, rec.file
    assert {r.split for r in split} <= {*USED, "excluded"}
    assert all(r.group for r in split)


def test_no_near_duplicate_group_crosses_splits(split):
    splits_of_group = defaultdict(set)
    for rec in split:
        splits_of_group[rec.group].add(rec.split)
    crossing = {g: s for g, s in splits_of_group.items() if len(s) > 1}
    assert crossing == {}
    assert max(Counter(r.group for r in split).values()) > 1, "no groups at all would make this test vacuous"


def test_recomputed_phash_pairs_never_straddle_two_splits(split, manifest, hashes):
    """Independent of the group column: every near-identical pair sits in one split."""
    distances = pairwise_hamming(hashes)
    split_of = {r.file: r.split for r in split}
    files = [r.file for r in manifest]
    close = np.argwhere(np.triu(distances <= NEAR_DUPLICATE_DISTANCE, k=1))
    assert len(close) > 100, "BUSI has hundreds of near-duplicate pairs; none found means the check is broken"
    leaks = [
        (files[i], files[j], int(distances[i, j]), split_of[files[i]], split_of[files[j]])
        for i, j in close
        if split_of[files[i]] in USED and split_of[files[j]] in USED and split_of[files[i]] != split_of[files[j]]
    ]
    assert leaks == []


def test_pairwise_hamming_equals_imagehash_distance(busi_dir, manifest, hashes):
    rng = np.random.default_rng(0)
    picks = rng.choice(len(manifest), size=12, replace=False)
    distances = pairwise_hamming(hashes[picks])
    phashes = []
    for i in picks:
        with Image.open(busi_dir / manifest[i].file) as img:
            phashes.append(imagehash.phash(img.convert("L")))
    for a in range(len(picks)):
        for b in range(len(picks)):
            assert distances[a, b] == phashes[a] - phashes[b]


def test_near_duplicate_groups_are_connected_components():
    # 0-1 close, 1-2 close (0-2 far: chained), 3 alone, 4-5 close.
    d = np.full((6, 6), 30)
    np.fill_diagonal(d, 0)
    for i, j in ((0, 1), (1, 2), (4, 5)):
        d[i, j] = d[j, i] = 5
    groups = near_duplicate_groups(d, threshold=6)
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3 and groups[4] == groups[5]
    assert len(set(near_duplicate_groups(d, threshold=4))) == 6


def test_split_is_about_70_10_20_within_each_class(split):
    for label in CLASS_NAMES:
        counts = Counter(r.split for r in split if r.label == label and r.split in USED)
        total = sum(counts.values())
        assert total > 100
        assert 0.65 <= counts["train"] / total <= 0.75, (label, counts)
        assert 0.07 <= counts["val"] / total <= 0.13, (label, counts)
        assert 0.17 <= counts["test"] / total <= 0.23, (label, counts)


def test_mixed_label_groups_are_excluded_and_nothing_else_is(split):
    mixed = mixed_label_groups(split)
    assert mixed, "BUSI has near-duplicates with contradictory labels"
    excluded = {r.file for r in split if r.split == "excluded"}
    assert excluded == {r.file for rs in mixed.values() for r in rs}


def test_regenerating_the_split_with_the_same_seed_gives_the_committed_file(busi_dir, tmp_path):
    regenerated = tmp_path / "busi_split.csv"
    write_split_file(build_split_records(busi_dir, seed=0), regenerated)
    assert regenerated.read_bytes() == DEFAULT_SPLIT_FILE.read_bytes()


def test_cross_validation_folds_keep_groups_whole_and_test_every_image_once(split):
    folds = cross_validation_folds(split, k=5, seed=0)
    usable = [r for r in split if r.split != "excluded"]
    assert len(folds) == 5
    tested = Counter(r.file for _, test in folds for r in test)
    assert set(tested) == {r.file for r in usable}
    assert set(tested.values()) == {1}
    for train, test in folds:
        assert {r.file for r in train} | {r.file for r in test} == {r.file for r in usable}
        assert not {r.group for r in train} & {r.group for r in test}
        assert all(r.split != "excluded" for r in train + test)
        for label in CLASS_NAMES:  # stratified: every class in every test fold, about a fifth of it
            share = sum(r.label == label for r in test) / sum(r.label == label for r in usable)
            assert 0.12 <= share <= 0.28, (label, share)


def test_subset_keeps_a_class_balanced_prefix(split):
    chosen = records_in(split, "train", subset=12)
    assert Counter(r.label for r in chosen) == {label: 4 for label in CLASS_NAMES}
    assert all(r.split == "train" for r in chosen)
    assert len(records_in(split, "test")) == sum(r.split == "test" for r in split)


# ------------------------------------------------------------------------ manifest check


def _copy_subset(busi_dir: Path, manifest: list[ImageRecord], dest: Path, per_class: int = 2) -> list[ImageRecord]:
    chosen = [r for label in CLASS_NAMES for r in [m for m in manifest if m.label == label][:per_class]]
    with open(busi_dir / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row["file"] in {r.file for r in chosen}]
        fields = reader.fieldnames
    with open(dest / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for rec in chosen:
        (dest / rec.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(busi_dir / rec.file, dest / rec.file)
    return chosen


def test_modified_and_missing_files_stop_with_their_names(busi_dir, manifest, tmp_path):
    chosen = _copy_subset(busi_dir, manifest, tmp_path)
    records = read_manifest(tmp_path)
    assert [r.file for r in records] == [r.file for r in chosen]
    verify_files(tmp_path, records)  # an intact copy passes

    modified, missing = chosen[1].file, chosen[4].file
    with open(tmp_path / modified, "ab") as f:
        f.write(b"\0")
    (tmp_path / missing).unlink()
    with pytest.raises(DataIntegrityError) as err:
        verify_files(tmp_path, records)
    message = str(err.value)
    assert modified in message and missing in message
    assert "2 file(s)" in message and "--allow-data-mismatch" in message
    assert sorted(find_mismatches(tmp_path, records)) == sorted(
        [f"missing: {missing}", f"modified (sha256 differs): {modified}"]
    )
    verify_files(tmp_path, records, allow_mismatch=True)  # the explicit override


def test_folder_without_manifest_is_reported(tmp_path):
    with pytest.raises(DataIntegrityError, match="manifest.csv"):
        read_manifest(tmp_path)
    with pytest.raises(DataIntegrityError, match="split file not found"):
        read_split_file(tmp_path / "nope.csv")


def test_class_folder_records_skip_masks_and_other_files(tmp_path, speckle_image):
    for name in ("benign/a.png", "benign/a_mask.png", "malignant/b.jpg", "malignant/notes.txt", "other/c.png"):
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("x")
        else:
            Image.fromarray(speckle_image).save(path)
    records = folder_records(tmp_path)
    assert [(r.file, r.label) for r in records] == [("benign/a.png", "benign"), ("malignant/b.jpg", "malignant")]
    with pytest.raises(DataIntegrityError, match="no class sub-folders"):
        folder_records(tmp_path / "other")
