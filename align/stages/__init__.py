"""Training stages. Each module: a config dataclass, the training logic, and `main(cfg)`. Stages never import
the CLI; shared options live in `options`, the shared trainer lifecycle in `common`."""
