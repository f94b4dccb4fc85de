"""The Composer Callbacks a YAML names under `callbacks:`, by name, and the one every run gets."""

from composer import callbacks

from cdcd_composer.callbacks.final_export import FinalExport
from cdcd_composer.callbacks.noise_seeding import BatchNoiseSeed
from cdcd_composer.callbacks.time_warp_refit import TimeWarpRefit
from cdcd_composer.callbacks.training_samples import TrainingSamples

CALLBACKS: dict[str, type] = {
    'speed_monitor': callbacks.SpeedMonitor,
    'lr_monitor': callbacks.LRMonitor,
    'memory_monitor': callbacks.MemoryMonitor,
    'optimizer_monitor': callbacks.OptimizerMonitor,
    'runtime_estimator': callbacks.RuntimeEstimator,
    'time_warp_refit': TimeWarpRefit,
    'training_samples': TrainingSamples,
    'export_weights': FinalExport,
}

__all__ = ['CALLBACKS', 'BatchNoiseSeed', 'FinalExport', 'TimeWarpRefit', 'TrainingSamples']
