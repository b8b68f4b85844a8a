"""Engine glue MONAI lacks: data discovery, synthetic scrolls, trainer, handlers, schedulers, metric, launcher."""
