"""The options of a conversion (`data_prep/convert_tinystories.py`), without the code that runs it.

Nothing here imports torch, transformers or Streaming: the command line (`cdcd_composer.arguments`)
reads them and answers `-h` at once.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field

SOURCES = ('hub', 'files', 'synthetic')
LAYOUTS = ('padded', 'packed')  # one story per canvas, or stories packed into full windows
OVERFLOWS = ('truncate', 'split')  # what happens to a story longer than its canvas


@dataclass
class ConvertOptions:
    """Every option of a conversion; the fields that shape the data are its `settings`."""

    out_root: str
    source: str = 'hub'
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    dataset: str = 'roneneldan/TinyStories'
    hub_train_split: str = 'train'
    hub_val_split: str = 'validation'
    text_column: str = 'text'
    val_fraction: float | None = None
    tokenizer: str | None = None
    train_tokenizer: int | None = None
    seq_len: int = 128
    layout: str = 'padded'
    overflow: str = 'truncate'
    num_train: int | None = None
    num_val: int | None = None
    seed: int = 17
    max_story_chars: int = 100_000
    num_workers: int | None = None
    batch_stories: int = 1000
    size_limit: str = '64mb'
    overwrite: bool = False
    progress: bool = True

    RUNTIME_ONLY = ('out_root', 'num_workers', 'batch_stories', 'overwrite', 'progress')

    def settings(self) -> dict:
        """The options that decide the output; a rerun with equal settings resumes."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_ONLY}

    def command(self) -> str:
        """The command that makes this data again (its settings other than the defaults), into OUT_ROOT.

        Neither the output folder nor the worker count enters it: the data do not depend on them.
        """
        defaults = ConvertOptions(out_root='').settings()
        args = ['python', 'data_prep/convert_tinystories.py', '--out_root', 'OUT_ROOT']
        for key, value in self.settings().items():
            if value != defaults[key]:
                args += [f'--{key}', *(map(str, value) if isinstance(value, list) else [str(value)])]
        return shlex.join(args)

    def tokenizer_settings(self) -> dict:
        """The options that decide the tokenizer."""
        keys = ['tokenizer', 'train_tokenizer']
        if self.train_tokenizer is not None:  # Trained on the train split: its options count too.
            keys += ['source', 'train_files', 'dataset', 'hub_train_split', 'text_column', 'val_fraction']
            keys += ['num_train', 'seed', 'max_story_chars']
        return {k: getattr(self, k) for k in keys}
