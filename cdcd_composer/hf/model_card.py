"""The export folder's `README.md`: a Hugging Face model card written from the run spec and eval."""

from __future__ import annotations

from typing import Any

from cdcd_composer.diffusion import CDCDDiffusion

HUB_DATASETS = {'tinystories': 'roneneldan/TinyStories'}


def _front_matter(model: CDCDDiffusion) -> list[str]:
    dataset = HUB_DATASETS.get(model.spec.data.source)
    lines = ['---', 'library_name: transformers', 'tags:', '- text-diffusion', '- cdcd', '- custom_code']
    if dataset:
        lines += ['datasets:', f'- {dataset}']
    return [*lines, 'language:', '- en', 'license: apache-2.0', '---', '']


def _training_lines(model: CDCDDiffusion) -> list[str]:
    spec, data = model.spec, model.spec.data
    counts = ', '.join(f'{n:,} {split}' for split, n in data.num_examples.items())
    trained = model.trained
    progress = 'an unrecorded number of batches (the file it was exported from did not say)'
    if trained and {'batch', 'sample', 'token'} <= set(trained):
        progress = (
            f'{trained["batch"]:,} batches ({trained["sample"]:,} sequences, {trained["token"]:,} tokens)'
        )
    sc = f'p = {spec.self_conditioning}' if spec.self_conditioned else 'off'
    return [
        '## Training',
        '',
        f'- Data: `{data.source}` ({counts} canvases of {data.seq_len} tokens, {data.layout}), '
        f'tokenizer `{data.tokenizer}` (vocabulary {spec.model.vocab_size}).',
        f'- Trained for {progress}; these are the **{spec.weights}** weights.',
        f'- Noise levels t in [{spec.t_min:g}, {spec.t_max:g}] drawn from a time warp fitted to the loss; '
        f'self-conditioning {sc}.',
        '',
    ]


def _evaluation_lines(report: dict[str, Any] | None) -> list[str]:
    from cdcd_composer.evaluation_report import markdown

    if report is None:
        return [
            '## Evaluation',
            '',
            'Not evaluated at export. Run `python eval.py MODEL --data_root DATA --out report.json` and '
            'export again with `--eval report.json` to put the figures here.',
            '',
        ]
    return ['## Evaluation', '', f'`{report.get("command", "eval.py")}`', '', markdown(report), '']


def model_card(model: CDCDDiffusion, report: dict[str, Any] | None = None) -> str:
    """The card's Markdown: what the model is, its data and training, its eval figures, how to sample.

    Args:
        model: The exported model (its spec and, where known, `trained`).
        report: `eval.py --out`'s JSON report (CE against t, the likelihood bound, sample quality).
    """
    config = model.config
    params = sum(p.numel() for p in model.model.parameters())
    non_embedding = model.model.non_embedding_parameters()
    lines = [
        *_front_matter(model),
        '# CDCD text diffusion model',
        '',
        'A Continuous Diffusion for Categorical Data model (Dieleman et al. 2022) trained with '
        'the cdcd-composer recipe (MosaicML Composer): a bidirectional transformer '
        'denoises L2-normalised token embeddings corrupted with Gaussian noise of std t, trained with '
        'cross-entropy (score interpolation); sampling integrates the probability-flow ODE.',
        '',
        f'- {params / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding): {config.n_layers} '
        f'layers, d_model {config.d_model}, {config.n_heads} heads, d_embed {config.d_embed}.',
        '',
        *_training_lines(model),
        *_evaluation_lines(report),
        '## Sampling',
        '',
        '```python',
        'from transformers import AutoModel',
        'model = AutoModel.from_pretrained(PATH_OR_REPO, trust_remote_code=True)',
        "print(model.generate(num_samples=4, prompt='Once upon a time', tau=0.7, seed=0).texts)",
        '```',
        '',
        '`generate` returns `ids` (num_samples, seq_len) and `texts`. With the same settings and seed '
        'they equal what `python generate.py` samples from the original export. Other arguments: '
        '`template` (a story with `___` blanks to fill), `solver`, `guidance`, `self_conditioning`.',
        '',
    ]
    return '\n'.join(lines)
