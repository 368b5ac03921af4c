"""The teacher's outputs on a student's fixed views: computed once, exactly, cached, resumable.

Any teacher: logits and attention maps of every view, computed in blocks saved as they are done
(a killed run resumes) and cached per teacher weights and view bank.

A feature-ensemble teacher is ImageNet backbones followed by an affine head (pooling,
standardisation, one linear layer). The backbones' pooled features and attention maps of a view
depend only on the backbones and the view's pixels, and a bank seeds each image's plain and
augmented views by the image alone (``ViewBank.plain_views``), so those views are the same in
every fold. Their outputs go to a store keyed by backbone weights and view content, shared by
every fold and recipe, and each fold's head turns them into its logits; only the fold's mixup
views (blended with another image of that fold) go through the whole teacher. With frozen
backbones the five folds of a cross-validation share one store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from kdcore.checkpoint import CheckpointMeta, load_checkpoint
from kdcore.distill import attention_map
from kdcore.engine import ViewBank, model_device, to_model_input
from kdcore.models import FeatureEnsemble, WeightsError, load_tensor_file, map_and_logits, save_tensor_file
from kdcore.runtime import CPU
from kdcore.transforms import Preprocess, resize_views

PARTIAL_EVERY_VIEWS = 2048  # outputs are saved this often, so a killed run resumes
Outputs = dict[str, torch.Tensor]


def output_keys(ensemble: bool) -> tuple[str, ...]:
    """The keys of ``teacher_outputs``: a feature ensemble adds its ``pooled`` features."""
    return ("logits", "attention", "pooled") if ensemble else ("logits", "attention")


def saved_tensors(file: Path, keys: tuple[str, ...], what: str) -> Outputs | None:
    """The dict saved in ``file`` when it is readable and has ``keys``, else ``None`` (a
    damaged or tampered file is named in a warning). Read with ``weights_only``: never runs code."""
    if not file.is_file():
        return None
    try:
        saved = load_tensor_file(file)
        if isinstance(saved, dict) and all(k in saved for k in keys):
            return saved
        raise WeightsError(f"{file.name}: not a {what} (keys {sorted(keys)} missing)")
    except WeightsError as exc:
        print(f"warning: ignoring {what} {file}: {exc}; computing it anew")
        return None


def cached_tensors(cache_file: Path, compute: Callable[[], Outputs], keys: tuple[str, ...], what: str) -> Outputs:
    """The tensors saved in ``cache_file``, or ``compute()``'s, then saved there (a damaged
    file is ignored with a warning and recomputed)."""
    saved = saved_tensors(cache_file, keys, f"{what} cache")
    if saved is not None:
        return saved
    saved = compute()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    save_tensor_file(saved, cache_file)
    return saved


@torch.no_grad()
def teacher_outputs(
    teacher: torch.nn.Module, views: torch.Tensor, preprocess: Preprocess, attention_side: int, batch_size: int = 16
) -> Outputs:
    """``logits`` (B, C), ``attention`` maps (B, side*side) and, for a feature ensemble, its
    ``pooled`` features (B, F) on (B, 1, S, S) uint8 views, each resized to the teacher's input
    size first when it differs (the same view, seen by both)."""
    size, device = preprocess.cfg.input_size, model_device(teacher)
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "attention": [], "pooled": []}
    for chunk in views.split(batch_size):
        chunk = chunk if chunk.shape[-1] == size else resize_views(chunk, size)
        feature_map, logits = map_and_logits(teacher, to_model_input(preprocess, chunk.to(device)))
        parts["logits"].append(logits.float().cpu())
        parts["attention"].append(attention_map(feature_map, attention_side).float().cpu())
        if isinstance(teacher, FeatureEnsemble):
            parts["pooled"].append(teacher.forward_head(feature_map, pre_logits=True).float().cpu())
    return {key: torch.cat(values) for key, values in parts.items() if values}


def resumable_teacher_outputs(
    teacher: torch.nn.Module, views: torch.Tensor, preprocess: Preprocess, attention_side: int, partial: Path
) -> Outputs:
    """``teacher_outputs`` over many views in blocks, with a progress bar; after each block the
    outputs so far go to ``partial``, and a rerun continues from there (the file is removed at
    the end). On 2 cores an ensemble teacher needs about an hour for 10,000 views."""
    keys = output_keys(isinstance(teacher, FeatureEnsemble))
    done = saved_tensors(partial, keys, "partial teacher-output") or {}
    blocks = [done] if done else []
    start = len(done["logits"]) if done else 0
    with tqdm(total=len(views), initial=start, desc="teacher outputs on the views") as bar:
        for first in range(start, len(views), PARTIAL_EVERY_VIEWS):
            blocks.append(
                teacher_outputs(teacher, views[first : first + PARTIAL_EVERY_VIEWS], preprocess, attention_side)
            )
            save_tensor_file(_joined(blocks), partial)
            bar.update(len(blocks[-1]["logits"]))
    partial.unlink(missing_ok=True)
    return _joined(blocks)


def _joined(blocks: list[Outputs]) -> Outputs:
    return {key: torch.cat([b[key] for b in blocks]) for key in blocks[0]}


def _bank_outputs(
    teacher_path: Path, views: torch.Tensor, cache: Path, attention_side: int, device: torch.device
) -> Outputs:
    """Whole-teacher outputs on (N, V, 1, S, S) views, cached by teacher weights and views."""
    key = hashlib.sha256(views.numpy().tobytes()).hexdigest()[:16]
    meta = CheckpointMeta.read(teacher_path)
    weights_sha = meta.weights_sha256[:16]
    cache_file = cache / f"teacher_outputs_{weights_sha}_{key}_{attention_side}.pt"

    def compute() -> Outputs:
        teacher, meta = load_checkpoint(teacher_path)
        teacher.to(device, memory_format=torch.channels_last)
        partial = cache_file.with_name(cache_file.stem + ".partial.pt")
        cache.mkdir(parents=True, exist_ok=True)
        flat = resumable_teacher_outputs(
            teacher, views.reshape(-1, *views.shape[2:]), Preprocess(meta.preprocess), attention_side, partial
        )
        return {k: v.reshape(*views.shape[:2], -1) for k, v in flat.items()}

    return cached_tensors(cache_file, compute, output_keys(meta.model.kind == "ensemble"), "teacher-output")


def backbone_sha256(teacher: FeatureEnsemble) -> str:
    """Digest of the backbones' weights and buffers (not the head): equal for teachers that
    share their frozen ImageNet backbones."""
    digest = hashlib.sha256()
    for name, tensor in teacher.members.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


STORE_EVERY_IMAGES = 128  # the shared store is saved this often while it grows


def _shared_store(
    teacher: FeatureEnsemble, meta: CheckpointMeta, bank: ViewBank, cache: Path, attention_side: int
) -> Outputs:
    """``pooled`` (N, P, F) and ``attention`` (N, P, A) of each image's P plain views, from the
    store of these backbones for P views per image (keyed by the views' content); images not in it yet are computed
    and added, saved every ``STORE_EVERY_IMAGES`` images (a killed run resumes)."""
    name = f"backbone_outputs_{backbone_sha256(teacher)[:16]}_{attention_side}_{bank.plain_views}views.pt"
    store_file = cache / name  # one store per number of plain views: its rows stack an image's views
    empty: dict = {"keys": [], "pooled": torch.empty(0), "attention": torch.empty(0)}
    store = saved_tensors(store_file, tuple(empty), "backbone-output store") or empty
    plain = bank.views[:, : bank.plain_views]
    view_keys = [hashlib.sha256(image_views.numpy().tobytes()).hexdigest() for image_views in plain]
    index = {key: i for i, key in enumerate(store["keys"])}
    missing = [i for i, key in enumerate(view_keys) if key not in index]
    preprocess = Preprocess(meta.preprocess)
    with tqdm(total=len(missing) * bank.plain_views, desc="backbone outputs on the views (shared)") as bar:
        for first in range(0, len(missing), STORE_EVERY_IMAGES):
            rows = missing[first : first + STORE_EVERY_IMAGES]
            out = teacher_outputs(teacher, plain[rows].reshape(-1, *plain.shape[2:]), preprocess, attention_side)
            shape = (len(rows), bank.plain_views, -1)
            store = {
                "keys": [*store["keys"], *(view_keys[i] for i in rows)],
                "pooled": torch.cat([store["pooled"], out["pooled"].reshape(shape)]),
                "attention": torch.cat([store["attention"], out["attention"].reshape(shape)]),
            }
            cache.mkdir(parents=True, exist_ok=True)
            save_tensor_file(store, store_file)
            bar.update(len(out["pooled"]))
    index = {key: i for i, key in enumerate(store["keys"])}
    rows = [index[key] for key in view_keys]
    return {"pooled": store["pooled"][rows], "attention": store["attention"][rows]}


class ViewOutputs(NamedTuple):
    """The teacher's outputs on a bank's (N, V) views: logits (N, V, C), attention maps
    (N, V, side*side) and, for a feature ensemble, its standardised pooled features (N, V, F)
    (what its linear head reads; ``None`` for other teachers and when not asked for)."""

    logits: torch.Tensor
    attention: torch.Tensor
    features: torch.Tensor | None


@torch.no_grad()
def teacher_view_outputs(
    teacher_path: Path,
    bank: ViewBank,
    cache: Path,
    attention_side: int,
    device: torch.device = CPU.device,
    with_features: bool = True,
) -> ViewOutputs:
    """The teacher's outputs on the bank's views: through the shared backbone store where the
    teacher and the bank allow it, else (and for mixup views) through the whole teacher, cached
    per teacher and views. ``with_features=False`` drops the features (for KD without feature
    matching: a feature ensemble's are about 125 MB per fold at 24 views per image)."""
    if CheckpointMeta.read(teacher_path).model.kind != "ensemble" or not bank.plain_views:
        saved = _bank_outputs(teacher_path, bank.views, cache, attention_side, device)
        keep = with_features and "pooled" in saved
        features = _standardised(load_checkpoint(teacher_path)[0], saved["pooled"]) if keep else None
        return ViewOutputs(saved["logits"], saved["attention"], features)
    teacher, meta = load_checkpoint(teacher_path)  # a FeatureEnsemble
    teacher.to(device, memory_format=torch.channels_last)
    shared = _shared_store(teacher, meta, bank, cache, attention_side)
    pooled, attention = shared["pooled"], shared["attention"]
    if bank.views.shape[1] > bank.plain_views:  # mixup views: the fold's own
        mixed = _bank_outputs(
            teacher_path, bank.views[:, bank.plain_views :].contiguous(), cache, attention_side, device
        )
        pooled = torch.cat([pooled, mixed["pooled"]], dim=1)
        attention = torch.cat([attention, mixed["attention"]], dim=1)
    features = _standardised(teacher, pooled)
    logits = teacher.classifier(features.to(device).flatten(0, 1)).float().cpu().reshape(*pooled.shape[:2], -1)
    return ViewOutputs(logits, attention, features if with_features else None)


def _standardised(teacher: FeatureEnsemble, pooled: torch.Tensor) -> torch.Tensor:
    """(N, V, F) pooled features through the (eval-mode) teacher's standardisation, returned on the CPU."""
    flat = teacher.standardise(pooled.to(model_device(teacher)).flatten(0, 1))
    return flat.float().cpu().reshape(pooled.shape)
