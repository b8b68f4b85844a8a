"""Data: datalists and splits, the volume store, synthetic scrolls, input checks, device augmentation."""
