"""Where a run resumes from: finding complete checkpoints, trusting a load_path, naming the way out.

Composer resumes from the `latest-rank0.pt` pointer or `load_path`; these helpers cover what it
does not: a pointer that was never written, a damaged newest checkpoint, and pickles from places
others can write.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import zipfile

from cdcd_composer.checkpoints.loading import CHECKPOINT_NAME, is_sharded_checkpoint
from cdcd_composer.checkpoints.trust import outside_allowlist, refusal
from cdcd_composer.config import TrainConfig
from cdcd_composer.storage import Folder, is_remote

log = logging.getLogger(__name__)


def checkpoints_in(folder: str) -> list[str]:
    """Checkpoint names in a save folder (local or remote), oldest first by batch."""
    names = [n for n in Folder(folder).list_names() if CHECKPOINT_NAME.match(n)]
    return sorted(names, key=lambda n: int(re.search(r'ba(\d+)', n).group(1)))


def checkpoint_is_complete(folder: str, name: str) -> bool:
    """Whether a checkpoint in `folder` is whole, without unpickling it.

    A `.pt` is a zip archive (torch.save): every member's CRC must check out. A sharded checkpoint
    is a folder that is complete once its `.metadata` exists (written after the shards).
    """
    root = Folder(folder)
    if not name.endswith('.pt'):
        return root.exists(f'{name}/.metadata')
    with tempfile.TemporaryDirectory() as tmp:
        local = (
            root.fetch_file(name, os.path.join(tmp, name))
            if is_remote(folder)
            else os.path.join(folder, name)
        )
        try:
            with zipfile.ZipFile(local) as archive:
                return archive.testzip() is None
        except (zipfile.BadZipFile, OSError, EOFError):
            return False


def resolve_autoresume(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, or a copy whose `load_path` lets autoresume find checkpoints that lack their pointer.

    Composer resumes from the `latest-rank0.pt` pointer only; a run killed between uploading a
    checkpoint and its pointer would start again from scratch. Then the newest complete checkpoint
    (older ones when the newest is damaged) becomes `load_path`, which Composer uses when no
    pointer exists.

    Raises:
        ValueError: checkpoints exist but none is complete.
    """
    if not cfg.autoresume or cfg.save_folder is None:
        return cfg
    folder = cfg.save_folder.format(run_name=cfg.run_name)
    names = Folder(folder).list_names()
    found = checkpoints_in(folder)
    if not found or any(n.startswith('latest-rank0.pt') for n in names):
        return cfg
    for name in reversed(found):
        if checkpoint_is_complete(folder, name):
            log.warning('%s has no latest-rank0.pt pointer; resuming from %s, its newest complete checkpoint',
                        folder, name)  # fmt: skip
            return dataclasses.replace(cfg, load_path=f'{folder}/{name}')
        log.warning('skipping %s/%s: the checkpoint is incomplete or damaged', folder, name)
    raise ValueError(
        f'{folder} holds checkpoints ({", ".join(found)}) but none is complete: move them away to start '
        'afresh'
    )


def checkpoint_to_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint the Trainer will load: autoresume's `latest-rank0.pt` target, else `load_path`.

    Composer prefers the pointer in `save_folder` to `load_path` when autoresuming. Locally the
    pointer is a symlink; in an object store it is a `latest-rank0.pt.symlink` object holding
    the checkpoint's key. The result is a path or key whose name tells the format: `....pt` is a
    monolithic checkpoint, anything else a sharded (DCP) folder.
    """
    if cfg.autoresume and cfg.save_folder is not None:
        folder = cfg.save_folder.format(run_name=cfg.run_name)
        root = Folder(folder)
        if not is_remote(folder):
            pointer = os.path.join(folder, 'latest-rank0.pt')
            if os.path.lexists(pointer):
                return os.path.realpath(pointer)
        elif root.exists('latest-rank0.pt.symlink'):
            with tempfile.TemporaryDirectory() as tmp:
                local = root.fetch_file('latest-rank0.pt.symlink', os.path.join(tmp, 'pointer'))
                with open(local) as f:
                    return f.read().strip()
    return cfg.load_path


def unloadable_checkpoint(cfg: TrainConfig, error: Exception) -> ValueError:
    """The one-line error for a checkpoint that cannot be loaded, naming the way out."""
    folder = cfg.save_folder.format(run_name=cfg.run_name) if cfg.save_folder else None
    older = checkpoints_in(folder)[:-1] if folder else []
    way_out = f'set load_path={folder}/{older[-1]} to resume from the one before' if older else 'start afresh'
    return ValueError(
        f'cannot load the checkpoint to resume from ({type(error).__name__}: '
        f'{str(error).splitlines()[0][:120] if str(error) else ""}); it is damaged: delete it and its '
        f'latest-rank0.pt pointer, or {way_out}'
    )


def looks_like_a_checkpoint(path: str) -> bool:
    """A torch.save file: a zip archive (the default format) or a bare pickle (protocol >= 2)."""
    with open(path, 'rb') as f:
        head = f.read(4)
    return head.startswith(b'PK\x03\x04') or head[:1] == b'\x80'


def check_load_path(cfg: TrainConfig) -> None:
    """A load_path exists and, being a pickle, names only the allowlisted types (`checkpoints.trust`).

    Read without unpickling; the load itself is weights-only too (`weights_only_composer_loads`).

    Raises:
        ValueError: one line naming the path and the fix.
    """
    if cfg.load_path is None:
        return
    if not is_remote(cfg.load_path) and not os.path.exists(cfg.load_path):
        raise ValueError(f'load_path {cfg.load_path} not found: pass a checkpoint written by train.py')
    if os.path.isdir(cfg.load_path) and not is_sharded_checkpoint(cfg.load_path):
        inside = checkpoints_in(cfg.load_path)
        example = f'{cfg.load_path.rstrip("/")}/{inside[-1]}' if inside else 'a .pt file written by train.py'
        raise ValueError(
            f'load_path {cfg.load_path} is a folder, not a checkpoint (a sharded one holds .metadata): pass '
            f'a checkpoint file such as {example}'
        )
    if os.path.isfile(cfg.load_path) and not looks_like_a_checkpoint(cfg.load_path):
        raise ValueError(
            f'load_path {cfg.load_path} is not a PyTorch checkpoint: pass a .pt file (or sharded checkpoint '
            'folder) written by train.py'
        )
    outside = outside_allowlist(cfg.load_path) if os.path.isfile(cfg.load_path) else []
    if outside and not cfg.trust_checkpoint:
        reason = f'it holds {", ".join(outside[:3])}, outside the checkpoint allowlist'
        raise refusal(cfg.load_path, reason, flag='trust_checkpoint=true')
