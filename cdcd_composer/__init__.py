"""CDCD (continuous diffusion for categorical data) as a MosaicML Composer recipe."""
