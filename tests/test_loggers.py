"""TensorBoard and MLflow, offline: a real tiny run writes to both, and the stores are read back.

What must be there: the refit statistics and the eval CE per t as scalars, the time-warp figure
as an image, the training-sample table (MLflow; Composer's TensorBoard logger has no tables),
and the final export as an artifact (MLflow).
"""

from __future__ import annotations

import pytest

from cdcd_composer.commands import train

pytestmark = pytest.mark.slow


def test_a_tiny_run_logs_scalars_figure_samples_and_export_to_tensorboard_and_mlflow(tiny_config, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard_dir, mlflow_uri = tmp_path / 'tb', f'file://{tmp_path}/mlruns'
    cfg = dict(
        tiny_config,
        loggers={
            'tensorboard': {'log_dir': str(tensorboard_dir), 'flush_interval': 1},
            'mlflow': {
                'tracking_uri': mlflow_uri,
                'experiment_name': 'cdcd-test',
                'run_name': 'tiny',
                'synchronous': True,
                'log_system_metrics': False,
            },
        },  # fmt: skip
        callbacks=dict(
            tiny_config['callbacks'],
            training_samples=dict(tiny_config['callbacks']['training_samples'], interval='2ba'),  # at 2 and 4
            time_warp_refit=dict(
                tiny_config['callbacks']['time_warp_refit'],
                interval='2ba',
                buffer_size=64,
                n_bins=8,
                min_evidence=0.0,
            ),
        ),  # fmt: skip
    )
    train.main(cfg)

    run_dir = next(tensorboard_dir.rglob('events.out.tfevents.*')).parent  # log_dir/run_name
    events = EventAccumulator(str(run_dir), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    scalars = set(events.Tags()['scalars'])
    assert {'time_warp/accepted', 'time_warp/evidence', 'time_warp/mass_below_t10'} <= scalars
    assert {'metrics/eval/CE_t1', 'metrics/eval/CE_t10'} <= scalars
    assert any(tag.startswith('time_warp') for tag in events.Tags()['images'])
    figure = events.Images(next(tag for tag in events.Tags()['images'] if tag.startswith('time_warp')))[-1]
    assert figure.encoded_image_string[:4] == b'\x89PNG' and figure.width > 100

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name('cdcd-test').experiment_id])
    metrics = run.data.metrics
    assert {'time_warp/accepted', 'metrics/eval/CE_t1', 'time_warp/mass_below_t10'} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert 'samples.json' in artifacts and 'export' in artifacts and 'images' in artifacts
    export = {a.path for a in client.list_artifacts(run.info.run_id, 'export')}
    assert {'export/model.safetensors', 'export/cdcd_config.json', 'export/tokenizer'} <= export
    images = [a.path for a in client.list_artifacts(run.info.run_id, 'images')]
    assert any('time_warp' in path and path.endswith('.png') for path in images)
    table = client.load_table(run.info.experiment_id, 'samples.json', run_ids=[run.info.run_id])
    assert list(table.columns)[:3] == ['batch', 'prompt', 'sample'] and len(table) >= 4
    assert table['sample'].str.len().gt(0).all()


def test_logger_settings_that_cannot_log_are_one_line_before_anything_is_built(tmp_path, monkeypatch):
    """TensorBoard's folder a file, W&B online without a key, an MLflow server that does not answer."""
    import socket

    from cdcd_composer.loggers import check_loggers

    a_file = tmp_path / 'tb'
    a_file.write_text('not a folder')
    with pytest.raises(ValueError, match=r'loggers.tensorboard.log_dir=.*tb is a file; give a folder'):
        check_loggers({'tensorboard': {'log_dir': str(a_file)}})
    monkeypatch.setenv('HOME', str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    monkeypatch.setenv('WANDB_MODE', 'online')
    with pytest.raises(ValueError, match='loggers.wandb has no API key: .* WANDB_MODE=offline'):
        check_loggers({'wandb': {}})
    monkeypatch.setenv('WANDB_MODE', 'offline')
    check_loggers({'wandb': {}})  # offline logs without a key
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(('127.0.0.1', 0))
        port = closed.getsockname()[1]
    with pytest.raises(ValueError, match=rf'tracking_uri=http://127.0.0.1:{port} did not answer in 5 s'):
        check_loggers({'mlflow': {'tracking_uri': f'http://127.0.0.1:{port}'}})
    check_loggers(
        {'mlflow': {'tracking_uri': f'file://{tmp_path}/mlruns'}, 'tensorboard': {'log_dir': str(tmp_path)}}
    )
