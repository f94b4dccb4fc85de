"""notebooks/walkthrough.ipynb runs top to bottom, headless, with a reduced step count."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# Executes the notebook's code cells in order in one namespace, as a kernel would, naming the
# cell that fails. (No Jupyter kernel needed: the notebook uses no IPython magics.)
RUNNER = """
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))['cells'] if c['cell_type'] == 'code']
namespace = {'__name__': '__main__'}
for index, cell in enumerate(cells):
    source = ''.join(cell['source'])
    try:
        exec(compile(source, f'<cell {index}>', 'exec'), namespace)
    except Exception:
        print(f'code cell {index} failed:\\n{source}', file=sys.stderr)
        raise
"""


def test_walkthrough_runs_headless(tmp_path):
    notebook = REPO / 'notebooks' / 'walkthrough.ipynb'
    cells = json.loads(notebook.read_text())['cells']
    assert not any(
        line.lstrip().startswith(('%', '!')) for c in cells for line in c['source']
    )  # plain Python
    env = dict(os.environ, WALKTHROUGH_STEPS='30', WALKTHROUGH_OUT=str(tmp_path), MPLBACKEND='Agg')
    proc = subprocess.run([sys.executable, '-c', RUNNER, str(notebook)], cwd=REPO / 'notebooks', env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'step 30: loss' in proc.stdout
    assert 'sentences the grammar derives exactly' in proc.stdout
    assert (tmp_path / 'data' / 'cdcd_dataset.json').exists()
