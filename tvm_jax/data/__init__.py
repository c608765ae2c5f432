"""Input pipelines (grain) and dataset formats: prepared ImageNet latents and bundled sources."""
