"""BUSI discovery, manifest check, near-duplicate groups, the group-aware split file,
folder datasets for evaluation, and in-memory image caches for training."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from kdcore.config import CLASS_NAMES
from kdcore.hashing import sha256_file
from kdcore.imaging import IMAGE_SUFFIXES
from kdcore.transforms import resize_grey

# pHash Hamming distance at or below which two BUSI images are the same scene.
# Chosen from the measured nearest-neighbour distribution (splits/README.md): twins
# pile up at 0-8, a valley spans 8-12, unrelated images start at 14; 12 errs on the safe side.
NEAR_DUPLICATE_DISTANCE = 12
SPLIT_FIELDS = ("file", "sha256", "group", "label", "split")


class DataIntegrityError(RuntimeError):
    """The data folder does not match what the manifest or split file promises."""


@dataclass(frozen=True)
class ImageRecord:
    file: str  # path relative to the data root, e.g. "benign/benign (1).png"
    label: str
    sha256: str
    group: str = ""
    split: str = ""
    masks: tuple[str, ...] = ()


def read_manifest(root: Path) -> list[ImageRecord]:
    """Rows of ``root/manifest.csv`` as records (masks kept for localisation)."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.is_file():
        raise DataIntegrityError(f"no manifest.csv in {root}: is this the BUSI folder? (pass --data DIR)")
    with open(manifest, newline="") as f:
        return [
            ImageRecord(
                file=row["file"],
                label=row["label"],
                sha256=row["sha256"],
                masks=tuple(m for m in row["masks"].split(";") if m),
            )
            for row in csv.DictReader(f)
        ]


def find_mismatches(root: Path, records: list[ImageRecord]) -> list[str]:
    """Human-readable problems: files missing or whose sha256 differs from the record."""
    problems = []
    for rec in tqdm(records, desc="checking sha256", leave=False):
        path = Path(root) / rec.file
        if not path.is_file():
            problems.append(f"missing: {rec.file}")
        elif sha256_file(path) != rec.sha256:
            problems.append(f"modified (sha256 differs): {rec.file}")
    return problems


def verify_files(root: Path, records: list[ImageRecord], allow_mismatch: bool = False) -> None:
    """Stop with a message naming every differing file unless ``allow_mismatch``."""
    problems = find_mismatches(root, records)
    if problems and not allow_mismatch:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataIntegrityError(
            f"{len(problems)} file(s) in {root} do not match the manifest/split file:\n  "
            f"{shown}{more}\nRestore the original data, or pass --allow-data-mismatch to "
            "train anyway (results will not be comparable)."
        )


def perceptual_hashes(root: Path, records: list[ImageRecord]) -> np.ndarray:
    """(N, 64) boolean pHash bits of each image."""
    bits = []
    for rec in tqdm(records, desc="pHash", leave=False):
        with Image.open(Path(root) / rec.file) as img:
            bits.append(imagehash.phash(img.convert("L")).hash.flatten())
    return np.array(bits, dtype=bool)


def pairwise_hamming(bits: np.ndarray) -> np.ndarray:
    """(N, N) Hamming distances between pHash bit vectors."""
    b = bits.astype(np.int32)
    return b.shape[1] - (b @ b.T + (1 - b) @ (1 - b).T)


def near_duplicate_groups(distances: np.ndarray, threshold: int) -> np.ndarray:
    """Connected components of the graph 'distance <= threshold' (union-find)."""
    n = len(distances)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(distances <= threshold, k=1))):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)])
    _, group_index = np.unique(roots, return_inverse=True)
    return group_index


def mixed_label_groups(records: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Groups whose members carry different labels."""
    by_group: dict[str, list[ImageRecord]] = {}
    for rec in records:
        by_group.setdefault(rec.group, []).append(rec)
    return {g: rs for g, rs in by_group.items() if len({r.label for r in rs}) > 1}


def group_aware_split(
    records: list[ImageRecord], seed: int = 0, test_folds: int = 5, val_folds: int = 8
) -> list[ImageRecord]:
    """Assign train/val/test (~70/10/20) keeping groups whole and classes stratified.

    Groups whose members disagree on the label are marked ``excluded``: their ground
    truth is contradictory, so they can neither teach nor grade a model.
    """
    mixed = set(mixed_label_groups(records))
    usable = [r for r in records if r.group not in mixed]
    labels = np.array([r.label for r in usable])
    groups = np.array([r.group for r in usable])
    outer = StratifiedGroupKFold(n_splits=test_folds, shuffle=True, random_state=seed)
    rest_idx, test_idx = next(outer.split(np.zeros(len(usable)), labels, groups))
    inner = StratifiedGroupKFold(n_splits=val_folds, shuffle=True, random_state=seed)
    train_sub, val_sub = next(inner.split(np.zeros(len(rest_idx)), labels[rest_idx], groups[rest_idx]))
    split = np.empty(len(usable), dtype=object)
    split[test_idx] = "test"
    split[rest_idx[train_sub]] = "train"
    split[rest_idx[val_sub]] = "val"
    assigned = {r.file: s for r, s in zip(usable, split)}
    return [ImageRecord(r.file, r.label, r.sha256, r.group, assigned.get(r.file, "excluded"), r.masks) for r in records]


def cross_validation_folds(
    records: list[ImageRecord], k: int = 5, seed: int = 0
) -> list[tuple[list[ImageRecord], list[ImageRecord]]]:
    """k (train, test) pairs over the non-excluded records, groups whole, classes stratified."""
    usable = [r for r in records if r.split != "excluded"]
    labels = [r.label for r in usable]
    groups = [r.group for r in usable]
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [
        ([usable[i] for i in tr], [usable[i] for i in te])
        for tr, te in folds.split(np.zeros(len(usable)), labels, groups)
    ]


def build_split_records(root: Path, threshold: int = NEAR_DUPLICATE_DISTANCE, seed: int = 0):
    """Manifest -> records with near-duplicate groups and the split assigned."""
    records = read_manifest(root)
    groups = near_duplicate_groups(pairwise_hamming(perceptual_hashes(root, records)), threshold)
    grouped = [ImageRecord(r.file, r.label, r.sha256, f"g{g:04d}", "", r.masks) for r, g in zip(records, groups)]
    return group_aware_split(grouped, seed=seed)


def write_split_file(records: list[ImageRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SPLIT_FIELDS)
        for r in records:
            writer.writerow([r.file, r.sha256, r.group, r.label, r.split])


def read_split_file(path: Path, root: Path | None = None) -> list[ImageRecord]:
    """The committed split; with ``root``, mask names are joined from its manifest."""
    path = Path(path)
    if not path.is_file():
        raise DataIntegrityError(f"split file not found: {path}")
    masks = {r.file: r.masks for r in read_manifest(root)} if root else {}
    with open(path, newline="") as f:
        return [
            ImageRecord(
                row["file"], row["label"], row["sha256"], row["group"], row["split"], masks.get(row["file"], ())
            )
            for row in csv.DictReader(f)
        ]


def records_in(records: list[ImageRecord], split: str, subset: int = 0) -> list[ImageRecord]:
    """Records of one split; ``subset`` > 0 keeps a class-balanced prefix (smoke runs)."""
    chosen = [r for r in records if r.split == split]
    if subset <= 0:
        return chosen
    per_class = max(1, subset // len(CLASS_NAMES))
    counts: Counter[str] = Counter()
    kept = []
    for r in chosen:
        if counts[r.label] < per_class:
            kept.append(r)
            counts[r.label] += 1
    return kept


def folder_records(root: Path) -> list[ImageRecord]:
    """Images in class sub-folders (benign/ malignant/ normal/, any subset) of any folder.

    BUSI-style ``*_mask*`` files are skipped.
    """
    root = Path(root)
    present = [c for c in CLASS_NAMES if (root / c).is_dir()]
    if not present:
        raise DataIntegrityError(f"{root} has no class sub-folders; expected some of {', '.join(CLASS_NAMES)}.")
    records = [
        ImageRecord(str(p.relative_to(root)), label, "")
        for label in present
        for p in sorted((root / label).rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES and "_mask" not in p.stem
    ]
    if not records:
        raise DataIntegrityError(f"no images found under the class folders of {root}.")
    return records


def resize_all(greys: list[np.ndarray], size: int) -> torch.Tensor:
    """(N, 1, size, size) uint8 cache of grey images, resized as ``Preprocess.resize`` does."""
    return torch.stack([torch.from_numpy(resize_grey(g, size)).unsqueeze(0) for g in greys])


def lesion_mask(root: Path, record: ImageRecord) -> np.ndarray | None:
    """Union of an image's lesion masks (BUSI: benign and malignant images), or None if it has none."""
    masks = []
    for name in record.masks:
        with Image.open(Path(root) / Path(record.file).parent / name) as mask:
            masks.append(np.asarray(mask.convert("L")) > 0)
    union = np.logical_or.reduce(masks) if masks else None
    return union if union is not None and union.any() else None


def resized_masks(root: Path, records: list[ImageRecord], size: int) -> torch.Tensor:
    """(N, 1, size, size) uint8 lesion masks (1 inside a lesion; all 0 for images without one),
    resized like the images (squashed to size x size, nearest neighbour)."""
    out = torch.zeros((len(records), 1, size, size), dtype=torch.uint8)
    for i, record in enumerate(records):
        mask = lesion_mask(root, record)
        if mask is not None:
            small = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
            out[i, 0] = torch.from_numpy(small)
    return out


def label_indices(records: list[ImageRecord]) -> torch.Tensor:
    return torch.tensor([CLASS_NAMES.index(r.label) for r in records], dtype=torch.long)
