"""Engine glue MONAI lacks: data discovery, synthetic scrolls, trainer, handlers, schedulers, metric, launcher."""

from pipeline.utils.requirements import check_installed

check_installed()  # a too-old torch, MONAI, ... ends here in one line naming it and the version needed
