"""The Hugging Face export: a folder that `transformers` loads with `from_pretrained`, and its upload.

OUT/config.json             `CDCDHFConfig`: the run spec without its tokenizer, the time warp,
                            `auto_map` to the code below
OUT/model.safetensors       the denoiser's weights (EMA where the run kept them), with the
                            layout version and a checksum of the tensors in its metadata
OUT/tokenizer.json, ...     the training tokenizer (`AutoTokenizer` loads it)
OUT/configuration_cdcd.py   the config class (this package's `hf/configuration_cdcd.py`)
OUT/modeling_cdcd.py        the model and sampler, generated from the package's modules
OUT/README.md               the model card
"""

from __future__ import annotations

import os
from typing import Any

from cdcd_composer.diffusion import CDCDDiffusion
from cdcd_composer.export import export_size, read_json, split_folder
from cdcd_composer.hf.configuration_cdcd import HF_FORMAT, CDCDHFConfig
from cdcd_composer.hf.model_card import model_card
from cdcd_composer.hf.modeling_cdcd import (
    CHECKSUM_KEY,
    FORMAT_KEY,
    HF_WEIGHTS,
    WEIGHTS_PREFIX,
    tensors_sha256,
)
from cdcd_composer.hf.standalone import modeling_source
from cdcd_composer.storage import OWNER_MARKER, Folder, is_remote
from cdcd_composer.story_tokens import tokenizer_sha256

AUTO_MAP = {'AutoConfig': 'configuration_cdcd.CDCDHFConfig', 'AutoModel': 'modeling_cdcd.CDCDModel'}


def hf_config(model: CDCDDiffusion) -> CDCDHFConfig:
    """The `config.json` of `model`'s export."""
    import dataclasses

    spec, data = model.spec, model.spec.data
    config = CDCDHFConfig(
        denoiser=dataclasses.asdict(spec.model), t_min=spec.t_min, t_max=spec.t_max, seq_len=data.seq_len,
        padded=spec.padded, self_conditioning=spec.self_conditioning, weights=spec.weights,
        time_warp_masses=model.time_warp.masses.tolist(), dataset=data.to_json(), training=model.trained,
        bos_token_id=data.bos_id, eos_token_id=data.eos_id, pad_token_id=data.pad_id, sampling=spec.sampling,
    )  # fmt: skip
    config.auto_map, config.architectures = dict(AUTO_MAP), ['CDCDModel']
    return config


def write_hf_export(out: str, model: CDCDDiffusion, report: dict[str, Any] | None = None) -> None:
    """Writes `model` as a Hugging Face folder at `out` (local or object store), atomically.

    Args:
        out: Directory or URI; an existing one is replaced only if this package wrote it.
        model: A trained model with its run spec and data (the weights it holds are exported).
        report: `eval.py --out`'s report, for the model card's figures.

    Raises:
        ValueError: the model has no tokenizer or data description (built without data).
    """
    from safetensors.torch import save_file

    from cdcd_composer.hf import configuration_cdcd

    tokenizer = model.spec.text_tokenizer  # raises for a model built without data
    tensors = {WEIGHTS_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    metadata = {'format': 'pt', FORMAT_KEY: str(HF_FORMAT), CHECKSUM_KEY: tensors_sha256(tensors)}
    parent, name = split_folder(out)
    size = export_size(tensors.values(), model.config.vocab_size)
    with Folder(parent).staged_directory(name, size, 'the Hugging Face folder') as staging:
        save_file(tensors, os.path.join(staging, HF_WEIGHTS), metadata=metadata)
        config = hf_config(model)
        config.weights_sha256, config.tokenizer_sha256 = metadata[CHECKSUM_KEY], tokenizer_sha256(tokenizer)
        config.to_json_file(os.path.join(staging, 'config.json'), use_diff=True)
        tokenizer.save_pretrained(staging)
        with open(configuration_cdcd.__file__) as f:
            configuration = f.read()
        files = {'configuration_cdcd.py': configuration, 'modeling_cdcd.py': modeling_source()}
        files['README.md'] = model_card(model, report)
        for filename, text in files.items():
            with open(os.path.join(staging, filename), 'w') as f:
                f.write(text)


def read_report(path: str) -> dict[str, Any]:
    """An `eval.py --out` report, checked for the keys the model card reads.

    Raises:
        ValueError: unreadable, or not an eval report.
    """
    report = read_json(path, f'--eval {path}', 'pass the JSON that eval.py --out wrote')
    if not isinstance(report, dict) or not {'cross_entropy_vs_t', 'rows'} <= set(report):
        raise ValueError(f'--eval {path} is not an eval.py report; pass the JSON that eval.py --out wrote')
    return report


def push_to_hub(folder: str, repo_id: str, private: bool = False) -> str:
    """Uploads a local export folder to the Hub with `huggingface_hub.upload_folder`; returns its URL.

    Needs network access and a token (`huggingface-cli login` or HF_TOKEN).

    Raises:
        ValueError: `folder` is on an object store (upload from a local folder).
    """
    from huggingface_hub import create_repo, upload_folder

    if is_remote(folder):
        raise ValueError(
            f'--push_to_hub uploads a local folder, and {folder} is remote; export locally first'
        )
    create_repo(repo_id, private=private, exist_ok=True)
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        ignore_patterns=[OWNER_MARKER],
        commit_message='Upload CDCD model',
    )
    return getattr(commit, 'commit_url', None) or f'https://huggingface.co/{repo_id}'
