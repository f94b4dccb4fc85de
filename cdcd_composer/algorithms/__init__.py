"""The Composer Algorithms a YAML names under `algorithms:`, by name."""

from composer.algorithms import GradientClipping

from cdcd_composer.algorithms.distillation import Distillation
from cdcd_composer.algorithms.ema import EMA
from cdcd_composer.algorithms.self_conditioning import SelfConditioning

ALGORITHMS: dict[str, type] = {
    'gradient_clipping': GradientClipping,
    'ema': EMA,  # Composer's EMA cannot hold FSDP2's DTensors (cdcd_composer.averaged_weights)
    'self_conditioning': SelfConditioning,
    'distillation': Distillation,  # a few-step student of a teacher export (yamls/cdcd-tiny-distill.yaml)
}

__all__ = ['ALGORITHMS', 'EMA', 'Distillation', 'SelfConditioning']
