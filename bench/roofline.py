"""Roofline of one training microbatch, traced on fake tensors under CUDA's bf16 autocast policy.

    python bench/roofline.py --config yamls/cdcd-140m.yaml                  # the YAML's microbatch
    python bench/roofline.py --config yamls/cdcd-140m.yaml --batch_sizes 64 128 256 512

No GPU is needed: the model's training forward (`CDCDComposerModel.forward`: the corruption given,
the denoiser and the loss) and its backward run on fake tensors (shapes and dtypes, no data), and
every aten kernel is recorded. CUDA's autocast policy is emulated on the CPU: CPU autocast casts
the matmuls to bf16 as CUDA's does, and the functions on CUDA's fp32 list that CPU autocast
leaves alone (layer_norm, softmax, log_softmax, exp, log, pow, rsqrt, sum, norm, ...; torch's
`autocast_test_lists.AutocastTestLists`) are run in fp32 as CUDA autocast runs them.

Per eager microbatch it prints:
- kernels: aten ops that launch work (views and empty allocations excluded);
- matmul TFLOP: mm/addmm/bmm/baddbmm, and attention (4 B H L^2 D forward, twice that backward);
- non-matmul GB: bytes every other kernel reads and writes (each input tensor's distinct
  elements, each output once; an in-place op reads and writes its target once);
- vocab share: the part of those bytes moved by kernels that touch a vocabulary-sized tensor;
- peak GiB: the largest sum of live tensors created during the step (activations, saved
  tensors, gradients), plus the fp32 weights, their gradients and AdamW's two moments (16 B per
  parameter): the estimate the GPU recipes' microbatch is chosen from;
- the roofline ceiling of MFU on H100 SXM and H200 (989 TFLOP/s dense bf16; 3.35 and 4.8 TB/s):
  time = matmul FLOPs / (70% of peak) + non-matmul bytes / (80% of bandwidth), no launch
  overhead, no overlap; ceiling = matmul FLOPs / (time x peak).
Self-conditioning's no-grad pass, the optimizer step and the data loader are outside the trace.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter

import torch
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cdcd_composer.composer_model import CDCDComposerModel  # noqa: E402

GIB = 2**30
# (name, dense bf16 FLOP/s, memory bytes/s); efficiencies reached in practice by large GEMMs and copies.
DEVICES = (('H100 SXM', 989e12, 3.35e12), ('H200', 989e12, 4.8e12))
GEMM_EFFICIENCY, MEMORY_EFFICIENCY = 0.70, 0.80
# Functions CUDA autocast runs in fp32 (torch.testing._internal.autocast_test_lists, CUDA).
CUDA_FP32 = frozenset(
    'acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softmax log_softmax '
    'layer_norm group_norm norm cosine_similarity cumprod cumsum dist pdist cdist prod renorm sum logsumexp '
    'softplus nll_loss l1_loss smooth_l1_loss mse_loss cross_entropy kl_div'.split()
)
MATMULS = {'mm', 'addmm', 'bmm', 'baddbmm'}
FACTORIES = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided'}


class CudaFp32Policy(TorchFunctionMode):
    """Runs the functions of CUDA autocast's fp32 list in fp32 while (CPU) autocast is on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '').rstrip('_')
        if name in ('softmax', 'log_softmax') and kwargs.get('dtype') == torch.float32:
            x, dim = args[0], kwargs.get('dim', args[1] if len(args) > 1 else -1)
            if x.dtype in (torch.bfloat16, torch.half):  # CUDA reads half and writes fp32 in one kernel
                kernel = torch.ops.aten._softmax if name == 'softmax' else torch.ops.aten._log_softmax
                return kernel(x.view(torch.half), dim, True)  # a same-size view: fake tensors hold no data
        if name not in CUDA_FP32 or not torch.is_autocast_enabled('cpu'):
            return func(*args, **kwargs)

        def up(x):
            return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.half) else x

        with torch.autocast('cpu', enabled=False):
            return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches in `t` (broadcast dims count once)."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


SPARSE_READS = {'gather', 'index', 'index_select'}  # read what they write, and the index
SPARSE_WRITES = {'scatter_add', 'scatter', 'index_put', 'index_add'}  # touch what the source holds


def moved_bytes(name: str, schema, args: tuple, kwargs: dict, outputs: list[torch.Tensor]) -> int:
    """Bytes a kernel reads and writes.

    Each input's distinct elements and each output once; an in-place target is read and
    written, an `out=` target only written; sparse reads and writes move only what they touch.
    """
    named = dict(zip((a.name for a in schema.arguments), args)) | kwargs
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    rest = tensors([v for k, v in named.items() if k not in written])
    if name.rstrip('_') in SPARSE_WRITES:
        return 2 * sum(distinct_bytes(t) for t in rest)
    if name in SPARSE_READS:
        return 2 * sum(distinct_bytes(t) for t in outputs) + sum(distinct_bytes(t) for t in rest[1:])
    targets = tensors([named[k] for k in written])
    reread = sum(distinct_bytes(t) for t in targets) if written != ['out'] else 0
    return (
        sum(distinct_bytes(t) for t in rest) + reread + sum(distinct_bytes(t) for t in (targets or outputs))
    )


def tensors(tree) -> list[torch.Tensor]:
    """The tensors in a (nested) list or tuple of arguments or results."""
    out = []
    for x in tree if isinstance(tree, (list, tuple)) else [tree]:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(tensors(x))
    return out


class Recorder(TorchDispatchMode):
    """Counts kernels, matmul FLOPs, non-matmul bytes and live memory of the ops it sees."""

    def __init__(self, vocab_sizes: set[int]) -> None:
        super().__init__()
        self.vocab_sizes = vocab_sizes
        self.kernels, self.flops, self.bytes, self.vocab_bytes = 0, 0, 0, 0
        self.by_op: Counter[str] = Counter()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        views = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        inputs, outputs = tensors(list(args) + list(kwargs.values())), tensors(out)
        skip = views or name in {'_unsafe_view', 'lift_fresh', 'detach', 'alias', 'set_'} or name in FACTORIES
        if skip or func.namespace == 'prim' or not outputs:
            self._track(out)
            return out
        self.kernels += 1
        if name in MATMULS:
            a, b = (args[1], args[2]) if name in ('addmm', 'baddbmm') else (args[0], args[1])
            self.flops += 2 * a.numel() * b.shape[-1]
        elif 'scaled_dot_product' in name:
            q, k = args[0], args[1]
            if 'backward' in name:
                q, k = args[1], args[2]
            forward = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
            self.flops += forward * (2 if 'backward' in name else 1)
        else:
            moved = moved_bytes(name, schema, args, kwargs, outputs)
            self.bytes += moved
            self.by_op[name] += moved
            if any(t.dim() and t.shape[-1] in self.vocab_sizes for t in inputs + outputs):
                self.vocab_bytes += moved
        self._track(out)
        return out

    def _track(self, out) -> None:
        for t in tensors(out):
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))


def load_model(config: str, vocab_size: int | None) -> CDCDComposerModel:
    """The YAML's model (vocabulary from `vocab_size`, default BERT's 30522), on the CPU."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    model_cfg = dict(cfg['model'])
    model_cfg['vocab_size'] = vocab_size or model_cfg.get('vocab_size') or 30522
    diffusion = cfg.get('diffusion', {})
    return CDCDComposerModel(
        model_cfg, diffusion.get('t_min', 1.0), diffusion.get('t_max', 300.0), masking=cfg.get('masking')
    )


def trace(model: CDCDComposerModel, batch_size: int, seq_len: int) -> Recorder:
    """One training microbatch (forward, loss, backward) on fake tensors under the emulated policy."""
    mode = FakeTensorMode()
    denoiser = model.model
    for module in denoiser.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[key] = torch.nn.Parameter(mode.from_tensor(p.data), p.requires_grad)
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = mode.from_tensor(b)
    config = denoiser.config
    recorder = Recorder({config.vocab_size, getattr(denoiser, 'padded_vocab_size', config.vocab_size)})
    with mode:
        shape = (batch_size, seq_len)
        batch = {
            'tokens': torch.randint(config.vocab_size, shape),
            't': torch.rand(batch_size) * (model.spec.t_max - model.spec.t_min) + model.spec.t_min,
            'noise': torch.randn(*shape, config.d_embed),
            'generate_mask': torch.rand(shape) < 0.5,
            'self_cond': torch.randn(*shape, config.d_embed),
        }
        weights = sum(p.numel() for p in denoiser.parameters()) * 16
        with recorder, CudaFp32Policy(), torch.autocast('cpu', dtype=torch.bfloat16):
            loss = model(batch)['loss']
        with recorder:
            loss.backward()
    recorder.weights = weights
    return recorder


def peak_bytes(config: str, batch_size: int, seq_len: int, vocab_size: int | None) -> int:
    """Estimated peak bytes of one training microbatch and the weights, gradients and AdamW state."""
    r = trace(load_model(config, vocab_size), batch_size, seq_len)
    return r.peak + r.weights


def largest_microbatch(config: str, gib: float, seq_len: int = 128, vocab_size: int | None = None) -> int:
    """The largest microbatch in 64, 128, ..., 512 whose estimated peak fits 90% of `gib` (64 at least)."""
    at_64, at_128 = (peak_bytes(config, size, seq_len, vocab_size) for size in (64, 128))
    per_example = (at_128 - at_64) / 64
    fits = [size for size in range(64, 513, 64) if at_64 + (size - 64) * per_example <= 0.9 * gib * GIB]
    return max(fits, default=64)


def main(argv: list[str] | None = None) -> None:
    """Prints the table (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default=os.path.join(REPO, 'yamls', 'cdcd-140m.yaml'))
    p.add_argument('--batch_sizes', type=int, nargs='+', default=None, help="default: the YAML's microbatch")
    p.add_argument('--seq_len', type=int, default=128)
    p.add_argument('--vocab_size', type=int, default=None, help="default: the YAML's, else BERT's 30522")
    p.add_argument('--top', type=int, default=8, help='the ops that move the most bytes, at the first size')
    p.add_argument(
        '--fit_gib', type=float, default=None,
        help='only print the largest microbatch (a multiple of 64, at most 512) whose estimated peak fits '
        '90%% of this many GiB (the peak is linear in the microbatch: traced at 64 and 128)',
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.fit_gib is not None:
        fits = largest_microbatch(args.config, args.fit_gib, args.seq_len, args.vocab_size)
        print(f'microbatch_that_fits={fits}')
        return
    with open(args.config) as f:
        microbatch = yaml.safe_load(f).get('device_train_microbatch_size')
    sizes = args.batch_sizes or [microbatch if isinstance(microbatch, int) else 64]
    head = ['microbatch', 'kernels', 'matmul TFLOP', 'non-matmul GB', 'vocab share', 'peak GiB']
    head += [f'{name} ceiling' for name, _, _ in DEVICES]
    name = os.path.basename(args.config)
    print(f'{name}, {args.seq_len} tokens per sequence, eager, CUDA bf16 autocast policy')
    print('| ' + ' | '.join(head) + ' |\n|' + '---|' * len(head))
    first = None
    for size in sizes:
        r = trace(load_model(args.config, args.vocab_size), size, args.seq_len)
        first = first or r
        row = [
            size,
            r.kernels,
            f'{r.flops / 1e12:.2f}',
            f'{r.bytes / 1e9:.1f}',
            f'{r.vocab_bytes / r.bytes:.0%}',
        ]
        row.append(f'{(r.peak + r.weights) / GIB:.1f}')
        for _, peak, bandwidth in DEVICES:
            seconds = r.flops / (GEMM_EFFICIENCY * peak) + r.bytes / (MEMORY_EFFICIENCY * bandwidth)
            row.append(f'{r.flops / (seconds * peak):.1%}')
        print('| ' + ' | '.join(str(x) for x in row) + ' |')
    print(f'\nthe {args.top} ops that move the most bytes at microbatch {sizes[0]}:')
    for name, moved in first.by_op.most_common(args.top):
        print(f'  {name:40s} {moved / 1e9:6.2f} GB')


if __name__ == '__main__':
    main()
