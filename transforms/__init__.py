"""MONAI-style transforms: 3D TIFF reader/writer and topology post-processing (array + dict twins)."""
