"""Loads a Hugging Face export where cdcd_composer cannot be imported, samples, prints JSON.

    python tests/hf_standalone_generate.py FOLDER '{"num_samples": 4, "steps": 8, "seed": 3}' ...

Run as a fresh process by tests/test_hf_export.py: an import hook refuses `cdcd_composer`, and
the repository is taken off `sys.path`, so the folder's own code is all that can run. Each JSON
argument is one `generate` call; the output is one JSON line per call (ids and texts), after a
line with what `AutoConfig` and `AutoTokenizer` read.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys


class RefuseCdcdComposer(importlib.abc.MetaPathFinder):
    """Fails every import of the package: nothing in this process may use it."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split('.')[0] == 'cdcd_composer':
            raise ImportError(f'{fullname} must not be imported here')
        return None


def main() -> None:
    """Loads with the Auto classes offline and generates once per JSON argument."""
    sys.meta_path.insert(0, RefuseCdcdComposer())
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') not in (here, os.path.dirname(here))]
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(json.dumps({'model_type': config.model_type, 'vocab_size': len(tokenizer)}))
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    for request in sys.argv[2:]:
        out = model.generate(**json.loads(request))
        print(json.dumps({'ids': out.ids.tolist(), 'texts': out.texts}))
    leaked = sorted(name for name in sys.modules if name.split('.')[0] == 'cdcd_composer')
    print(json.dumps({'cdcd_composer_modules': leaked}))


if __name__ == '__main__':
    main()
